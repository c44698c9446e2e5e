"""Memory-lean distillation losses for real vocabulary sizes (same math as ``distill.losses``).

At 150k vocabularies the plain path keeps several float32 [N, V] intermediates alive for backward (log-probs,
probabilities, mixtures...). Here masked positions are processed ``chunk_size`` rows at a time, and each
chunk's gradient is computed right away in the forward pass (an ``autograd.Function`` that runs autograd on
the chunk, the approach of Liger-Kernel's fused losses); only the final gradient is kept, in the input dtype.
The peak extra memory is then one chunk's float32 intermediates plus that gradient.

* ``chunked_distillation_loss``: takes logits, like ``distillation_loss``.
* ``fused_distillation_loss``: takes last hidden states and output-layer weights and never materialises the
  full [N, V] logits: logits are built per chunk, and the gradients w.r.t. the student's hidden states,
  output weight and bias are accumulated chunk by chunk. Works for every objective. What an architecture does
  to ``hidden @ W.T + b`` before the softmax (Cohere's logit scale, Gemma 2's final softcapping) is a
  ``LogitTransform`` applied inside each chunk, for the student (differentiated through) and the teacher.
* ``head_logits``: the same head (weight, bias, transform) applied to hidden states in one go, for callers that
  want the full logits (a hidden-state teacher cache read by the plain or chunked loss).
* ``loss_fn_for(impl)``: "plain" | "chunked" -> a callable with ``distillation_loss``'s signature.

The teacher is treated as a constant (no gradient flows to teacher logits, hidden states or weights), and
the gradient is computed during the forward pass, so backward may run only once (no double backward).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.options import LOSS_IMPLS
from distill.losses.divergences import (
    align_vocab,
    check_mask,
    check_shapes,
    check_tau,
    distillation_loss,
    loss_scale,
    per_token,
    resolve_params,
)

__all__ = ["LOSS_IMPLS", "LogitTransform", "chunked_distillation_loss", "fused_distillation_loss", "head_logits",
           "loss_fn_for"]


class LogitTransform(NamedTuple):
    """What a model does to ``hidden @ W.T + b`` before its softmax: z -> softcap * tanh(scale * z / softcap).

    ``scale`` multiplies (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``); ``softcap`` is Gemma 2/3's
    ``final_logit_softcapping`` (None = no capping). The default is the identity. Computed in float32.
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: Tensor) -> Tensor:
        if self.is_identity:
            return z
        z = z.float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


_IDENTITY = LogitTransform()


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None,
                transform: LogitTransform | None = None) -> Tensor:
    """Logits of an output head: ``transform(hidden @ weight.T + bias)`` (in the weight's dtype when the transform
    is the identity, else float32)."""
    return (transform or _IDENTITY)(F.linear(hidden, weight, bias))


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


def _scale_value(scale: float | Tensor) -> float:
    """The loss scale as a float (a tensor num_tokens is read once; the chunk loop needs a number)."""
    return float(scale) if not isinstance(scale, Tensor) else scale.item()


def _chunks(rows: Tensor | None, n_rows: int, chunk_size: int):
    """Chunks of row indices: slices when every row counts (views, no copies), else index tensors."""
    if rows is None:
        return [slice(i, min(i + chunk_size, n_rows)) for i in range(0, n_rows, chunk_size)]
    return [rows[i : i + chunk_size] for i in range(0, rows.numel(), chunk_size)]


def _flat(x: Tensor) -> Tensor | None:
    """x [..., D] as a [N, D] view, or None when that would need a copy (e.g. logits[:, :-1])."""
    if x.dim() == 2:
        return x
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _take(x: Tensor, idx: slice | Tensor) -> Tensor:
    """Rows idx of x seen as [N, D], copying only those rows (never the whole of a non-viewable x)."""
    flat = _flat(x)
    if isinstance(idx, slice):
        if flat is not None:
            return flat[idx]
        idx = torch.arange(idx.start, idx.stop, device=x.device)
    if flat is not None:
        return flat.index_select(0, idx)
    return x[torch.unravel_index(idx, x.shape[:-1])]


def _put(buffer: Tensor, idx: slice | Tensor, value: Tensor) -> None:
    if isinstance(idx, slice):
        buffer[idx].copy_(value)
    else:
        buffer.index_copy_(0, idx, value.to(buffer.dtype))


def _selected_rows(mask: Tensor) -> tuple[Tensor | None, int]:
    """Indices of the rows that count (None when all do) and their number."""
    flat = mask.reshape(-1)
    if bool(flat.all()):
        return None, flat.numel()
    rows = flat.nonzero().squeeze(1)
    return rows, rows.numel()


class _ChunkedLoss(torch.autograd.Function):
    """scale * sum over selected rows of the per-token divergence, gradient computed chunk by chunk."""

    @staticmethod
    def forward(ctx, student, teacher, rows, spec, chunk_size, scale):
        name, tau_s, tau_t, params = spec
        want_grad = ctx.needs_input_grad[0]
        n_rows, vocab = student.shape[:-1].numel(), student.shape[-1]
        grad = student.new_zeros(n_rows, vocab) if want_grad else None
        total = torch.zeros((), dtype=torch.float64, device=student.device)  # exact-ish sum over chunks
        for idx in _chunks(rows, n_rows, chunk_size):
            s_chunk, t_chunk = align_vocab(_take(student, idx), _take(teacher, idx))
            with torch.enable_grad():
                s_chunk = s_chunk.detach().requires_grad_(want_grad)
                value = per_token(name, s_chunk, t_chunk.detach(), tau_s, tau_t, params).sum() * scale
                if want_grad:
                    (g,) = torch.autograd.grad(value, s_chunk)
                    _put(grad, idx, g)
            total += value.detach()
        ctx.save_for_backward(grad)
        ctx.student_shape = student.shape
        return total.float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if grad is not None:
            if grad_out.ne(1).item():  # skip a full pass in the usual case grad_out == 1
                grad = grad * grad_out.to(grad.dtype)
            grad = grad.view(ctx.student_shape)
        return grad, None, None, None, None, None


def chunked_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, divergence: str,
                              tau: float, chunk_size: int = 1024, tau_target: str = "both",
                              tau_squared: bool = True, num_tokens=None, **params) -> Tensor:
    """``distillation_loss`` computed ``chunk_size`` masked positions at a time (same value and gradient).

    Only the student gets a gradient, stored in the student logits' dtype; intermediates live per chunk.
    """
    params = resolve_params(divergence, params)
    tau_s, tau_t = check_tau(tau, tau_target)
    chunk_size = _check_chunk_size(chunk_size)
    check_shapes(student_logits, teacher_logits)
    mask = check_mask(mask, student_logits.shape[:-1])
    rows, count = _selected_rows(mask)
    scale = _scale_value(loss_scale(tau, tau_squared, count, num_tokens))
    # The logits go in with their own shape: a non-contiguous slice such as logits[:, :-1] is never copied
    # whole, only each chunk's rows are gathered.
    spec = (divergence, tau_s, tau_t, params)
    return _ChunkedLoss.apply(student_logits, teacher_logits, rows, spec, chunk_size, scale)


class _FusedLoss(torch.autograd.Function):
    """Like _ChunkedLoss, but the logits of each chunk are built from hidden states and output weights."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, rows, spec, chunk_size, scale):
        name, tau_s, tau_t, params, s_map, t_map = spec
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        # Weight/bias gradients summed over chunks in float32, cast once at the end.
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for idx in _chunks(rows, hidden.shape[0], chunk_size):
            h = _take(hidden, idx)
            t_logits = head_logits(_take(t_hidden, idx), t_weight, t_bias, t_map)
            logits, t_logits = align_vocab(F.linear(h, weight, bias), t_logits)
            with torch.enable_grad():
                # Differentiate w.r.t. the float32 pre-transform logits (through the transform); the matmul
                # backward is done by hand below so that weight gradients accumulate in place (no [V, H]
                # temporary per chunk).
                z = logits.detach().float().requires_grad_(True)
                value = per_token(name, s_map(z), t_logits.detach(), tau_s, tau_t, params).sum() * scale
                (dz,) = torch.autograd.grad(value, z)
            if need_h:
                _put(grad_h, idx, dz.to(weight.dtype) @ weight)
            if need_w:
                grad_w.addmm_(dz.t(), h.float())
            if need_b:
                grad_b += dz.sum(0)
            total += value.detach()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total.float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = None if not grad_out.ne(1).item() else grad_out
        out = []
        for g, dtype in ((grad_h, None), (grad_w, w_dtype), (grad_b, b_dtype)):
            if g is not None:
                g = g if scale is None else g * scale.to(g.dtype)
                g = g if dtype is None else g.to(dtype)
            out.append(g)
        return (*out, None, None, None, None, None, None, None)


def fused_distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                            teacher_weight: Tensor, mask: Tensor, *, divergence: str, tau: float,
                            chunk_size: int = 1024, tau_target: str = "both", tau_squared: bool = True,
                            num_tokens=None, student_bias: Tensor | None = None,
                            teacher_bias: Tensor | None = None, student_transform: LogitTransform | None = None,
                            teacher_transform: LogitTransform | None = None, **params) -> Tensor:
    """``distillation_loss`` on logits = transform(hidden @ weight.T (+ bias)), built chunk by chunk, never in full.

    Args:
        student_hidden, teacher_hidden: [..., H_s] and [..., H_t] last hidden states (same leading shape).
        student_weight, teacher_weight: [V_s, H_s] and [V_t, H_t] output-layer (lm_head) weights; V_t >= V_s
            follows the vocabulary rule of ``distill.losses.divergences.align_vocab``.
        mask: bool/integer [...] positions that count. Other arguments as in ``distillation_loss``.
        student_transform, teacher_transform: each model's logit scaling / softcapping (None = identity).

    Gradients flow to the student's hidden states, weight and bias (not to the teacher's).
    """
    params = resolve_params(divergence, params)
    tau_s, tau_t = check_tau(tau, tau_target)
    chunk_size = _check_chunk_size(chunk_size)
    _check_head(student_hidden, student_weight, student_bias, "student")
    _check_head(teacher_hidden, teacher_weight, teacher_bias, "teacher")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} must share their leading (position) shape")
    if teacher_weight.shape[0] < student_weight.shape[0]:
        raise ValueError(f"teacher vocabulary {teacher_weight.shape[0]} is smaller than the student's "
                         f"{student_weight.shape[0]}; allowed: equal, or a wider teacher (extra columns dropped)")
    mask = check_mask(mask, student_hidden.shape[:-1])
    rows, count = _selected_rows(mask)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    scale = _scale_value(loss_scale(tau, tau_squared, count, num_tokens))
    spec = (divergence, tau_s, tau_t, params, student_transform or _IDENTITY, teacher_transform or _IDENTITY)
    return _FusedLoss.apply(hidden, student_weight, student_bias, t_hidden, teacher_weight, teacher_bias,
                            rows, spec, chunk_size, scale)


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, who: str) -> None:
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{who} hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit; "
                         "allowed: hidden [..., H] with weight [V, H]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{who} bias {tuple(bias.shape)} must have shape ({weight.shape[0]},)")


def loss_fn_for(impl: str, *, chunk_size: int = 1024) -> Callable[..., Tensor]:
    """The logits-level loss for ``impl``: "plain" -> ``distillation_loss``, "chunked" -> the chunked one.

    Both returned callables take ``(student_logits, teacher_logits, mask, *, divergence, tau, tau_target,
    tau_squared, num_tokens, **params)``. "fused" works on hidden states, so it has its own entry point.
    """
    if impl == "plain":
        return distillation_loss
    if impl == "chunked":
        return functools.partial(chunked_distillation_loss, chunk_size=_check_chunk_size(chunk_size))
    if impl == "fused":
        raise ValueError("impl 'fused' takes hidden states and output weights, not logits: call "
                         "fused_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, "
                         "mask, ...) instead")
    raise ValueError(f"unknown loss impl {impl!r}; allowed: {', '.join(LOSS_IMPLS)} ('fused' via "
                     "fused_distillation_loss)")
