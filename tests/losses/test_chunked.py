"""Chunked and fused losses equal the plain path (values and gradients), for every objective."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.chunked import (LogitTransform, chunked_distillation_loss, fused_distillation_loss,
                                    head_logits, loss_fn_for)
from distill.losses.divergences import distillation_loss
from distill.options import DIVERGENCES

PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}, "akl": {"mu": 0.6},
          "ab": {"alpha": 0.4, "beta": 0.5}}
CLOSE = dict(rtol=1e-5, atol=1e-7)


def _inputs(seed: int, shape=(3, 7, 29), scale=3.0, dtype=torch.float32, full_mask=False):
    """Logits with -inf entries (shared padding, student-only, teacher-only) and a ragged (or full) mask."""
    g = torch.Generator().manual_seed(seed)
    s, t = scale * torch.randn(shape, generator=g), scale * torch.randn(shape, generator=g)
    s[..., -3:] = -math.inf
    t[..., -3:] = -math.inf
    s[0, 1, 4] = -math.inf
    t[2, 3, 5] = -math.inf
    mask = torch.rand(shape[:-1], generator=g) > 0.35
    mask[0, 1] = mask[2, 3] = True
    if full_mask:
        mask[:] = True  # every row counts: the chunks are views instead of gathered copies
    s[~mask] = math.nan  # padding garbage must not matter
    return s.to(dtype), t.to(dtype), mask


def _loss_and_grad(fn, student, *args, **kwargs):
    x = student.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize(("tau", "tau_target"), [(0.5, "both"), (2.0, "both"), (4.0, "teacher")])
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
@pytest.mark.parametrize("full_mask", [False, True])
def test_chunked_equals_plain(name, tau, tau_target, chunk_size, full_mask):
    s, t, mask = _inputs(DIVERGENCES.index(name), full_mask=full_mask)
    assert int(mask.sum()) % 5 != 0  # the chunk size 5 does not divide the token count
    kw = dict(divergence=name, tau=tau, tau_target=tau_target, **PARAMS.get(name, {}))
    want, want_grad = _loss_and_grad(distillation_loss, s, t, mask, **kw)
    got, got_grad = _loss_and_grad(chunked_distillation_loss, s, t, mask, chunk_size=chunk_size, **kw)
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, **CLOSE)
    torch.testing.assert_close(got_grad, want_grad, **CLOSE)


@pytest.mark.parametrize("full_mask", [False, True])
def test_chunked_takes_non_contiguous_logits(full_mask):
    """logits[:, :-1] (as in next-token training) is not viewable as [N, V]: rows are gathered per chunk."""
    s_all, t_all, _ = _inputs(37, shape=(3, 8, 29))
    s_all, t_all = s_all.nan_to_num(nan=0.5), t_all.nan_to_num(nan=0.5)
    mask = torch.ones(3, 7, dtype=torch.bool) if full_mask else torch.rand(3, 7) > 0.3
    results = []
    for fn, kw in ((distillation_loss, {}), (chunked_distillation_loss, {"chunk_size": 4})):
        x = s_all.clone().requires_grad_(True)
        loss = fn(x[:, :-1], t_all[:, :-1], mask, divergence="srkl", tau=2.0, **kw)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (want, want_grad), (got, got_grad) = results
    assert not s_all[:, :-1].is_contiguous()
    torch.testing.assert_close(got, want, **CLOSE)
    torch.testing.assert_close(got_grad, want_grad, **CLOSE)


@pytest.mark.parametrize("name", ["fkl", "jsd", "ab"])
def test_chunked_reductions_and_outer_scaling(name):
    """num_tokens, tau_squared=False and a loss scaled after the call (grad_out != 1) all match."""
    s, t, mask = _inputs(3)
    for kw in (dict(num_tokens=100), dict(num_tokens=torch.tensor(100)), dict(tau_squared=False)):
        kw = dict(divergence=name, tau=2.0, **kw)
        want, want_grad = _loss_and_grad(lambda *a, **k: 0.25 * distillation_loss(*a, **k), s, t, mask, **kw)
        got, got_grad = _loss_and_grad(lambda *a, **k: 0.25 * chunked_distillation_loss(*a, chunk_size=4, **k),
                                       s, t, mask, **kw)
        torch.testing.assert_close(got, want, **CLOSE)
        torch.testing.assert_close(got_grad, want_grad, **CLOSE)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_all_masked_gives_zero(name):
    s, t, mask = _inputs(5)
    loss, grad = _loss_and_grad(chunked_distillation_loss, s, t, torch.zeros_like(mask), divergence=name, tau=2.0)
    assert loss.item() == 0.0 and (grad == 0).all()


def test_chunked_bf16_grad_keeps_input_dtype_and_matches():
    s, t, mask = _inputs(7, dtype=torch.bfloat16)
    want, want_grad = _loss_and_grad(distillation_loss, s, t, mask, divergence="rkl", tau=2.0)
    got, got_grad = _loss_and_grad(chunked_distillation_loss, s, t, mask, divergence="rkl", tau=2.0, chunk_size=3)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-2, atol=1e-5)  # bf16 rounding of the gradient


def test_chunked_vocab_rule_non_leaf_and_no_grad():
    s, t, mask = _inputs(9)
    t_wide = torch.cat([t, torch.full((*t.shape[:-1], 4), -math.inf)], -1)
    kw = dict(divergence="jsd", tau=2.0)
    want, want_grad = _loss_and_grad(distillation_loss, s, t, mask, **kw)
    got, got_grad = _loss_and_grad(lambda x, *a, **k: chunked_distillation_loss(x * 1.0, *a, **k), s, t_wide, mask,
                                   chunk_size=6, **kw)
    torch.testing.assert_close(got, want, **CLOSE)
    torch.testing.assert_close(got_grad, want_grad, **CLOSE)
    with torch.no_grad():
        torch.testing.assert_close(chunked_distillation_loss(s, t, mask, **kw), want, **CLOSE)


# ---------------------------------------------------------------------------------------------------------
# fused: logits = hidden @ weight.T + bias, built per chunk


def _fused_inputs(seed: int, n_pos=(2, 9), h_s=6, h_t=10, v_s=23, v_t=23, bias=True):
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(*n_pos, h_s, generator=g), torch.randn(*n_pos, h_t, generator=g)
    ws, wt = torch.randn(v_s, h_s, generator=g), torch.randn(v_t, h_t, generator=g)
    bs = torch.randn(v_s, generator=g) if bias else None
    bt = torch.randn(v_t, generator=g) if bias else None
    if bias:
        bt[3] = -math.inf  # a teacher column outside the support
    mask = torch.rand(n_pos, generator=g) > 0.3
    return hs, ws, bs, ht, wt, bt, mask


def _leaves(*tensors):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in tensors]


@pytest.mark.filterwarnings("ignore:teacher vocabulary")
@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize(("bias", "v_t", "full_mask"), [(True, 23, False), (False, 27, False), (True, 23, True)])
def test_fused_equals_plain_on_logits(name, bias, v_t, full_mask):
    hs, ws, bs, ht, wt, bt, mask = _fused_inputs(11, bias=bias, v_t=v_t)
    if full_mask:
        mask[:] = True
    if not bias:
        wt[23:] = 0.0  # the wider teacher's extra columns (logit 0): dropped by the vocabulary rule
    kw = dict(divergence=name, tau=2.0, **PARAMS.get(name, {}))

    h1, w1, b1 = _leaves(hs, ws, bs)
    s_logits = torch.nn.functional.linear(h1, w1, b1)
    t_logits = torch.nn.functional.linear(ht, wt, bt)
    want = distillation_loss(s_logits, t_logits, mask, **kw)
    want.backward()

    h2, w2, b2 = _leaves(hs, ws, bs)
    got = fused_distillation_loss(h2, w2, ht, wt, mask, chunk_size=4, student_bias=b2, teacher_bias=bt, **kw)
    (0.5 * got).backward()  # grad_out != 1 path
    torch.testing.assert_close(got, want, **CLOSE)
    torch.testing.assert_close(h2.grad, 0.5 * h1.grad, **CLOSE)
    torch.testing.assert_close(w2.grad, 0.5 * w1.grad, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(b2.grad, 0.5 * b1.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("s_map", "t_map"), [(LogitTransform(scale=0.3), LogitTransform(softcap=2.0)),
                                              (LogitTransform(softcap=1.5), LogitTransform(scale=1 / 8.0)),
                                              (LogitTransform(scale=2.0, softcap=3.0), None)])
def test_fused_applies_each_models_logit_scale_and_softcap(s_map, t_map):
    """Cohere-style scaling and Gemma-2-style softcapping: same value and gradients as the transformed logits."""
    hs, ws, bs, ht, wt, bt, mask = _fused_inputs(41)
    ws, wt = 3 * ws, 3 * wt  # logits large enough for the cap to bite
    kw = dict(divergence="jsd", tau=2.0)
    h1, w1, b1 = _leaves(hs, ws, bs)
    s_logits = s_map(torch.nn.functional.linear(h1, w1, b1))
    t_logits = head_logits(ht, wt, bt, t_map)
    assert s_map.softcap is None or s_logits.abs().max() <= s_map.softcap
    want = distillation_loss(s_logits, t_logits, mask, **kw)
    want.backward()
    h2, w2, b2 = _leaves(hs, ws, bs)
    got = fused_distillation_loss(h2, w2, ht, wt, mask, chunk_size=4, student_bias=b2, teacher_bias=bt,
                                  student_transform=s_map, teacher_transform=t_map, **kw)
    got.backward()
    plain = fused_distillation_loss(hs, ws, ht, wt, mask, chunk_size=4, student_bias=bs, teacher_bias=bt, **kw)
    assert abs(plain.item() - want.item()) > 1e-3  # the transforms change the loss: the test can fail
    torch.testing.assert_close(got, want, **CLOSE)
    for a, b in ((h2.grad, h1.grad), (w2.grad, w1.grad), (b2.grad, b1.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_logit_transform_identity_keeps_dtype_and_values():
    z = torch.randn(4, 5, dtype=torch.bfloat16)
    assert LogitTransform().is_identity and LogitTransform()(z) is z
    capped = LogitTransform(softcap=0.5)(z)
    assert capped.dtype == torch.float32 and capped.abs().max() < 0.5


def test_fused_bf16_matches_plain_and_keeps_dtypes():
    hs, ws, bs, ht, wt, bt, mask = (x.to(torch.bfloat16) if x.is_floating_point() else x
                                    for x in _fused_inputs(31))
    h1, w1, b1 = _leaves(hs, ws, bs)
    want = distillation_loss(torch.nn.functional.linear(h1, w1, b1), torch.nn.functional.linear(ht, wt, bt), mask,
                             divergence="jsd", tau=2.0)
    want.backward()
    h2, w2, b2 = _leaves(hs, ws, bs)
    got = fused_distillation_loss(h2, w2, ht, wt, mask, divergence="jsd", tau=2.0, chunk_size=4, student_bias=b2,
                                  teacher_bias=bt)
    got.backward()
    assert got.dtype == torch.float32 and (h2.grad.dtype, w2.grad.dtype, b2.grad.dtype) == (torch.bfloat16,) * 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in ((h2.grad, h1.grad), (w2.grad, w1.grad), (b2.grad, b1.grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)  # bf16 matmuls/accumulation


def test_fused_frozen_weight_and_all_masked():
    hs, ws, bs, ht, wt, bt, mask = _fused_inputs(13)
    (h,) = _leaves(hs)
    loss = fused_distillation_loss(h, ws, ht, wt, mask, divergence="fkl", tau=1.0, chunk_size=3,
                                   student_bias=bs, teacher_bias=bt)
    loss.backward()
    assert h.grad is not None and ws.grad is None
    (h,) = _leaves(hs)
    zero = fused_distillation_loss(h, ws, ht, wt, torch.zeros_like(mask), divergence="fkl", tau=1.0)
    zero.backward()
    assert zero.item() == 0.0 and (h.grad == 0).all()


# ---------------------------------------------------------------------------------------------------------
# selector and bad input


def test_loss_fn_for_selects_implementations():
    s, t, mask = _inputs(17)
    assert loss_fn_for("plain") is distillation_loss
    chunked = loss_fn_for("chunked", chunk_size=2)
    torch.testing.assert_close(chunked(s, t, mask, divergence="tvd", tau=2.0),
                               distillation_loss(s, t, mask, divergence="tvd", tau=2.0), **CLOSE)
    with pytest.raises(ValueError, match=r"unknown loss impl 'liger'; allowed: plain, chunked"):
        loss_fn_for("liger")
    with pytest.raises(ValueError, match=r"impl 'fused' takes hidden states .* call fused_distillation_loss"):
        loss_fn_for("fused")
    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1, got 0"):
        loss_fn_for("chunked", chunk_size=0)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size(chunk_size):
    s, t, mask = _inputs(19)
    with pytest.raises(ValueError, match=rf"chunk_size must be an int >= 1, got {chunk_size!r}"):
        chunked_distillation_loss(s, t, mask, divergence="fkl", tau=1.0, chunk_size=chunk_size)


def test_chunked_shares_validation_with_plain():
    s, t, mask = _inputs(23)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        chunked_distillation_loss(s, t, mask, divergence="kl", tau=1.0)
    with pytest.raises(ValueError, match=r"student logits \(3, 7, 29\) and teacher logits \(3, 7, 28\)"):
        chunked_distillation_loss(s, t[..., :-1], mask, divergence="fkl", tau=1.0)
    with pytest.raises(ValueError, match=r"mask shape \(3, 6\)"):
        chunked_distillation_loss(s, t, mask[:, :-1], divergence="fkl", tau=1.0)


def test_fused_bad_shapes():
    hs, ws, bs, ht, wt, bt, mask = _fused_inputs(29)
    kw = dict(divergence="fkl", tau=1.0)
    with pytest.raises(ValueError, match=r"student hidden \(2, 9, 6\) and weight \(23, 5\) do not fit"):
        fused_distillation_loss(hs, ws[:, :5], ht, wt, mask, **kw)
    with pytest.raises(ValueError, match=r"teacher bias \(22,\) must have shape \(23,\)"):
        fused_distillation_loss(hs, ws, ht, wt, mask, teacher_bias=bt[:-1], **kw)
    with pytest.raises(ValueError, match=r"leading \(position\) shape"):
        fused_distillation_loss(hs, ws, ht[:, :-1], wt, mask, **kw)
    with pytest.raises(ValueError, match=r"teacher vocabulary 20 is smaller than the student's 23"):
        fused_distillation_loss(hs, ws, ht, wt[:20], mask, **kw)
    with pytest.raises(ValueError, match=r"mask shape \(2, 8\)"):
        fused_distillation_loss(hs, ws, ht, wt, mask[:, :-1], **kw)
