"""Distillation divergences with a temperature: the pure math of the project.

Conventions
-----------
* ``p = softmax(teacher_logits / tau)`` is the target, ``q = softmax(student_logits / tau)`` the model; the
  last axis is the vocabulary. With ``tau_target="teacher"`` only the teacher is softened (student at tau=1).
* Math runs in float32 whatever the input dtype (bf16/fp16 are upcast; float64 inputs stay float64), mixtures
  are taken in log space (``logaddexp`` of log-weights + log-probs), so logits of magnitude 1e4 are fine.
* Support: a vocabulary entry whose student OR teacher logit is -inf lies outside the support. Both
  distributions are renormalised over the common support and outside entries contribute nothing (value 0,
  gradient 0, never NaN). A position with no common entry at all contributes 0.
* Vocabulary rule (``align_vocab``): if the teacher has MORE columns than the student (padded vocabularies,
  e.g. teacher 152064 vs student 151936), the extra teacher columns are dropped; a warning is issued once per
  process if those columns carry more than 1e-4 probability mass (softmax at tau=1, any position), because
  then the teacher's distribution is really being truncated. Any other shape mismatch is a ValueError.
* ``divergence_per_token`` returns one value per position with no reduction and no tau^2 factor;
  ``distillation_loss`` reduces over masked positions and applies tau^2 (Hinton) when asked.

Each divergence is a small function of sanitised log-probs ``(lp, lq, support, **params)``; ``_REGISTRY``
maps names to (function, parameter defaults, validators). ``conf/divergence/<name>.yaml`` mirror the defaults.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


from distill.options import DIVERGENCES, TAU_TARGETS
__all__ = [
    "DIVERGENCES",
    "TAU_TARGETS",
    "align_vocab",
    "divergence_per_token",
    "distillation_loss",
    "kl_at_tau1",
    "resolve_params",
    # helpers shared with distill.losses.chunked
    "check_mask",
    "check_shapes",
    "check_tau",
    "loss_scale",
    "per_token",
]

VOCAB_MASS_WARN = 1e-4  # teacher mass in dropped columns above which we warn
_VOCAB_WARNED = False  # warn once per process (module state on purpose: the check costs a pass over logits)


# ----------------------------------------------------------------------------------------------------------
# divergences over sanitised log-probs: lp = log p (teacher), lq = log q (student), both 0 outside `support`


def _in_support(x: Tensor, support: Tensor | None) -> Tensor:
    """x inside the support, 0 outside (``support=None``: every entry is inside)."""
    return x if support is None else torch.where(support, x, 0.0)


def _msum(x: Tensor, support: Tensor | None) -> Tensor:
    """Sum over the vocabulary of the entries inside the support."""
    return _in_support(x, support).sum(-1)


def _kl(la: Tensor, lb: Tensor, support: Tensor) -> Tensor:
    """KL(a || b) = sum a (log a - log b)."""
    return _msum(la.exp() * (la - lb), support)


def _log_mix(w: float, la: Tensor, lb: Tensor) -> Tensor:
    """log(w*a + (1-w)*b) in log space (the mixture is of probabilities, not of log-probs)."""
    if w == 0.0:
        return lb
    if w == 1.0:
        return la
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def _fkl(lp, lq, support):
    return _kl(lp, lq, support)


def _rkl(lp, lq, support):
    return _kl(lq, lp, support)


def _jsd(lp, lq, support, beta):
    lm = _log_mix(beta, lp, lq)
    return beta * _kl(lp, lm, support) + (1.0 - beta) * _kl(lq, lm, support)


def _tvd(lp, lq, support):
    return 0.5 * _msum((lp.exp() - lq.exp()).abs(), support)


def _skl(lp, lq, support, alpha):
    return _kl(lp, _log_mix(alpha, lp, lq), support)  # KL(p || alpha p + (1-alpha) q)


def _srkl(lp, lq, support, alpha):
    return _kl(lq, _log_mix(alpha, lq, lp), support)  # KL(q || (1-alpha) p + alpha q)


def _akl(lp, lq, support, mu):
    """Adaptive KL: weigh FKL by the head gap and RKL by the tail gap (weights carry no gradient)."""
    with torch.no_grad():
        p, q = _in_support(lp.exp(), support), _in_support(lq.exp(), support)
        # The head is the shortest prefix of the sorted teacher probs whose mass reaches mu (always
        # holding the top token), widened to every token tied with its last one: membership then
        # depends on values only, not on how the sort orders ties (bf16 logits tie often), so the
        # loss is invariant to permutations of the vocabulary.
        p_sorted = p.sort(dim=-1, descending=True).values
        mass_before = p_sorted.cumsum(-1) - p_sorted
        n_head = (mass_before < mu).sum(-1, keepdim=True).clamp_min(1)
        boundary = p_sorted.gather(-1, n_head - 1)
        head = p >= boundary
        gap = (p - q).abs()
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return w_head * _kl(lp, lq, support) + (1.0 - w_head) * _kl(lq, lp, support)


def _ab(lp, lq, support, alpha, beta):
    """Alpha-beta divergence D_AB(p || q) (Cichocki et al. 2011; ABKD) with its generalised-KL limits."""
    if beta == 0.0:  # 1/a^2 sum [p^a log(p^a / q^a) - p^a + q^a]; (1, 0) is FKL
        pa, qa = (alpha * lp).exp(), (alpha * lq).exp()
        return _msum(pa * alpha * (lp - lq) - pa + qa, support) / alpha**2
    if alpha == 0.0:  # 1/b^2 sum [q^b log(q^b / p^b) - q^b + p^b]; (0, 1) is RKL
        qb, pb = (beta * lq).exp(), (beta * lp).exp()
        return _msum(qb * beta * (lq - lp) - qb + pb, support) / beta**2
    # General case. Note: for |alpha * beta| tiny but non-zero the three terms cancel to ~eps / |alpha * beta|
    # relative error in float32; use the exact limits (alpha or beta = 0) there.
    s = alpha + beta
    term = (alpha * lp + beta * lq).exp() - alpha / s * (s * lp).exp() - beta / s * (s * lq).exp()
    return -_msum(term, support) / (alpha * beta)


# ----------------------------------------------------------------------------------------------------------
# registry and validation


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class _Divergence:
    fn: Callable[..., Tensor]
    defaults: dict[str, float] = field(default_factory=dict)
    # param -> (predicate, human-readable allowed range)
    checks: dict[str, tuple[Callable[[float], bool], str]] = field(default_factory=dict)
    joint: Callable[[dict], str | None] | None = None  # returns an error message or None


def _open_unit(v):
    return 0.0 < v < 1.0


def _half_open_unit(v):
    return 0.0 <= v < 1.0


def _ab_joint(params: dict) -> str | None:
    if params["alpha"] + params["beta"] == 0:
        return f"ab: alpha + beta must not be 0, got alpha={params['alpha']}, beta={params['beta']}"
    return None


_REGISTRY: dict[str, _Divergence] = {
    "fkl": _Divergence(_fkl),
    "rkl": _Divergence(_rkl),
    "jsd": _Divergence(_jsd, {"beta": 0.5}, {"beta": (_open_unit, "0 < beta < 1")}),
    "tvd": _Divergence(_tvd),
    "skl": _Divergence(_skl, {"alpha": 0.1}, {"alpha": (_half_open_unit, "0 <= alpha < 1")}),
    "srkl": _Divergence(_srkl, {"alpha": 0.1}, {"alpha": (_half_open_unit, "0 <= alpha < 1")}),
    "akl": _Divergence(_akl, {"mu": 0.5}, {"mu": (lambda v: 0.0 <= v <= 1.0, "0 <= mu <= 1")}),
    "ab": _Divergence(
        _ab,
        {"alpha": 0.2, "beta": 0.7},
        {"alpha": (lambda v: True, "any finite real"), "beta": (lambda v: True, "any finite real")},
        _ab_joint,
    ),
}
assert tuple(_REGISTRY) == DIVERGENCES, "distill.options.DIVERGENCES names the registry's divergences, in order"


def resolve_params(name: str, params: dict) -> dict[str, float]:
    """Validate a divergence name and its params; return the full params (defaults filled in) as floats."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCES)}")
    spec = _REGISTRY[name]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(spec.defaults) or "none"
        raise ValueError(f"{name}: unknown param(s) {', '.join(unknown)}; allowed: {allowed}")
    full = {**spec.defaults, **params}
    for key, value in full.items():
        ok, allowed = spec.checks[key]
        if not _real(value) or not ok(float(value)):
            raise ValueError(f"{name}: {key}={value!r} is out of range; allowed: {allowed}")
    full = {k: float(v) for k, v in full.items()}
    if spec.joint is not None and (msg := spec.joint(full)) is not None:
        raise ValueError(msg)
    return full


def check_tau(tau, tau_target: str = "both") -> tuple[float, float]:
    """Validate tau and tau_target; return (student tau, teacher tau)."""
    if not _real(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if tau_target not in TAU_TARGETS:
        raise ValueError(f"unknown tau_target {tau_target!r}; allowed: {', '.join(TAU_TARGETS)}")
    tau = float(tau)
    return (tau if tau_target == "both" else 1.0), tau


def check_shapes(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Same leading shape, and the teacher's vocabulary at least as wide as the student's."""
    s, t = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if len(s) == 0 or s[:-1] != t[:-1] or t[-1] < s[-1]:
        raise ValueError(
            f"student logits {s} and teacher logits {t} do not match; allowed: equal shapes, or a teacher "
            "with more vocabulary columns (the extra ones are dropped)"
        )


def check_mask(mask, positions_shape: torch.Size) -> Tensor:
    """Return the mask as bool; it must be a bool/integer tensor shaped like the logits minus the vocab axis."""
    if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"mask must be a bool or integer tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape != positions_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits shape without the vocab "
                         f"axis {tuple(positions_shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def align_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Apply the vocabulary rule: drop the teacher's extra columns (a view), warning once if they carry mass.

    Raises ValueError for any other shape mismatch (naming both shapes).
    """
    global _VOCAB_WARNED
    check_shapes(student_logits, teacher_logits)
    v = student_logits.shape[-1]
    if teacher_logits.shape[-1] == v:
        return student_logits, teacher_logits
    if not _VOCAB_WARNED and teacher_logits.numel() > 0:
        with torch.no_grad():
            t = teacher_logits.float()
            mass = (t[..., v:].logsumexp(-1) - t.logsumexp(-1)).exp().nan_to_num(0.0).max().item()
        if mass > VOCAB_MASS_WARN:
            _VOCAB_WARNED = True
            warnings.warn(
                f"teacher vocabulary ({teacher_logits.shape[-1]}) is wider than the student's ({v}); the dropped "
                f"columns carry up to {mass:.3g} probability mass (> {VOCAB_MASS_WARN:g}): the teacher "
                "distribution is being truncated (warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
    return student_logits, teacher_logits[..., :v]


# ----------------------------------------------------------------------------------------------------------
# per-position values and reductions


def _log_softmax(x: Tensor, tau: float) -> Tensor:
    return F.log_softmax(x if tau == 1.0 else x / tau, dim=-1)


def _log_probs(student: Tensor, teacher: Tensor, tau_s: float,
               tau_t: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sanitised (lp, lq, support) of aligned logits, renormalised over the common finite support.

    ``support`` is None when every entry is inside it (the common case: saves several [N, V] temporaries).
    """
    dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dtype), teacher.to(dtype)
    joint = (s != -math.inf) & (t != -math.inf)
    if bool(joint.all()):
        return _log_softmax(t, tau_t), _log_softmax(s, tau_s), None
    empty = ~joint.any(-1, keepdim=True)  # no common entry: make both uniform, i.e. contribute 0
    fill = torch.where(empty, 0.0, -math.inf).to(dtype)
    support = joint | empty
    lq = _log_softmax(torch.where(joint, s, fill), tau_s)
    lp = _log_softmax(torch.where(joint, t, fill), tau_t)
    # Replace the -inf outside the support by 0 so that no inf/NaN can leak into values or gradients
    # (a masked-out 0 * (-inf) would still poison the backward pass through torch.where).
    return torch.where(support, lp, 0.0), torch.where(support, lq, 0.0), support


def per_token(name: str, student: Tensor, teacher: Tensor, tau_s: float, tau_t: float, params: dict) -> Tensor:
    """Unchecked core of ``divergence_per_token`` (validated name/params, aligned logits, separate taus)."""
    lp, lq, support = _log_probs(student, teacher, tau_s, tau_t)
    return _REGISTRY[name].fn(lp, lq, support, **params)


def divergence_per_token(name: str, student_logits: Tensor, teacher_logits: Tensor, *, tau: float = 1.0,
                         **params) -> Tensor:
    """Divergence D(p_tau || q_tau) per position (shape = logits shape minus the vocab axis), in float32.

    No reduction and no tau^2 factor. ``params`` are the divergence's own (see ``DIVERGENCES`` and the module
    docstring), defaults filled in; bad names, params or tau raise ValueError.
    """
    params = resolve_params(name, params)
    tau_s, tau_t = check_tau(tau)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)
    return per_token(name, student_logits, teacher_logits, tau_s, tau_t, params)


def loss_scale(tau: float, tau_squared: bool, count: int, num_tokens) -> float | Tensor:
    """Factor turning a masked sum into the loss: tau^2 (optional) / (num_tokens or the local count)."""
    if not isinstance(tau_squared, bool):
        raise ValueError(f"tau_squared must be a bool, got {tau_squared!r}")
    factor = float(tau) ** 2 if tau_squared else 1.0
    if num_tokens is None:
        return factor / max(count, 1)  # an all-false mask gives exactly 0, not 0/0
    if isinstance(num_tokens, Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens must be a scalar, got a tensor of shape {tuple(num_tokens.shape)}")
        return factor / num_tokens.float().clamp_min(1)  # a zero global count means every sum is 0
    if not _real(num_tokens) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a number > 0 or a scalar tensor, got {num_tokens!r}")
    return factor / float(num_tokens)


def _select(logits: Tensor, mask: Tensor) -> Tensor:
    """[n_selected, V] rows where mask is true. Only those rows are computed: padding costs nothing and its
    garbage (NaN, -inf) cannot leak into gradients. A full mask gives a view instead of a copy."""
    if bool(mask.all()):
        return logits.reshape(-1, logits.shape[-1])
    return logits[mask]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, divergence: str,
                      tau: float, tau_target: str = "both", tau_squared: bool = True, num_tokens=None,
                      **params) -> Tensor:
    """Scalar distillation loss: mean over ``mask`` positions of the divergence at temperature ``tau``.

    Args:
        student_logits, teacher_logits: [..., V] logits (the teacher may have extra vocab columns, dropped).
        mask: bool/integer [...] selecting the positions that count.
        divergence: one of ``DIVERGENCES``; ``params`` are its own parameters.
        tau: distillation temperature (> 0). ``tau_target="teacher"`` softens only the teacher.
        tau_squared: multiply by tau^2 so gradient scales compare across tau.
        num_tokens: if given, divide the masked sum by it instead of the local count (exact gradient
            accumulation across micro-batches / ranks: pass the global number of masked positions).
    """
    params = resolve_params(divergence, params)
    tau_s, tau_t = check_tau(tau, tau_target)
    check_shapes(student_logits, teacher_logits)
    mask = check_mask(mask, student_logits.shape[:-1])
    student, teacher = align_vocab(_select(student_logits, mask), _select(teacher_logits, mask))
    total = per_token(divergence, student, teacher, tau_s, tau_t, params).sum()
    return total * loss_scale(tau, tau_squared, student.shape[0], num_tokens)


@torch.no_grad()
def kl_at_tau1(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Sums of KL(p||q) and KL(q||p) at tau=1 over masked positions, and their count (no gradient).

    Returns ``{"fkl": float32 sum, "rkl": float32 sum, "tokens": int64 count}``; callers add these across
    batches/ranks and divide at the end, which is exact.
    """
    check_shapes(student_logits, teacher_logits)
    mask = check_mask(mask, student_logits.shape[:-1])
    student, teacher = align_vocab(_select(student_logits, mask), _select(teacher_logits, mask))
    lp, lq, support = _log_probs(student, teacher, 1.0, 1.0)
    return {
        "fkl": _fkl(lp, lq, support).sum().float(),
        "rkl": _rkl(lp, lq, support).sum().float(),
        "tokens": torch.tensor(student.shape[0], dtype=torch.int64, device=student.device),
    }
