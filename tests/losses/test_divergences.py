"""Tests for distill/losses/divergences.py against independent float64 references written with explicit probabilities."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from distill.losses import divergences as losses
from distill.losses.divergences import align_vocab, distillation_loss, divergence_per_token, kl_at_tau1
from distill.options import DIVERGENCES

TAUS = [0.5, 1.0, 2.0, 4.0]
# Every objective with its defaults, plus other parameter settings worth checking.
CASES = [(name, {}) for name in DIVERGENCES] + [
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("skl", {"alpha": 0.0}),
    ("skl", {"alpha": 0.5}),
    ("srkl", {"alpha": 0.0}),
    ("srkl", {"alpha": 0.5}),
    ("akl", {"mu": 0.0}),
    ("akl", {"mu": 0.9}),
    ("ab", {"alpha": 0.5, "beta": 0.5}),
    ("ab", {"alpha": 1.0, "beta": 0.0}),
    ("ab", {"alpha": 0.0, "beta": 1.0}),
    ("ab", {"alpha": 0.3, "beta": 0.0}),
    ("ab", {"alpha": 0.0, "beta": 0.4}),
    ("ab", {"alpha": 1.5, "beta": -0.5}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items()) or 'default'}" for n, p in CASES]
FAST = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------------------------------------
# float64 references: explicit probabilities p = exp(x) / sum exp(x), formulas in probability space


def _probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    z = logits / tau
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _ref_kl(a, b):
    return (a * torch.log(a / b)).sum(-1)


def _akl_weights(p: np.ndarray, q: np.ndarray, mu: float) -> np.ndarray:
    """Head weight per position with an explicit loop over the teacher's sorted tokens (ties at the boundary in)."""
    flat_p, flat_q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    out = np.empty(flat_p.shape[0])
    for i, (pi, qi) in enumerate(zip(flat_p, flat_q)):
        head, cum = [], 0.0
        for j in np.argsort(-pi, kind="stable"):
            head.append(j)
            cum += pi[j]
            if cum >= mu:
                break
        in_head = pi >= pi[head[-1]]  # tokens tied with the last head token are in the head too
        g_head, g_tail = np.abs(pi - qi)[in_head].sum(), np.abs(pi - qi)[~in_head].sum()
        out[i] = 0.5 if g_head + g_tail == 0 else g_head / (g_head + g_tail)
    return out.reshape(p.shape[:-1])


def _ref_ab(p, q, alpha, beta):
    if beta == 0:
        return ((p**alpha) * torch.log(p**alpha / q**alpha) - p**alpha + q**alpha).sum(-1) / alpha**2
    if alpha == 0:
        return ((q**beta) * torch.log(q**beta / p**beta) - q**beta + p**beta).sum(-1) / beta**2
    s = alpha + beta
    return -((p**alpha) * (q**beta) - alpha / s * p**s - beta / s * q**s).sum(-1) / (alpha * beta)


def reference(name, student, teacher, tau_s, tau_t=None, **params):
    """Float64 per-position divergence, written independently of the module."""
    p, q = _probs(teacher.double(), tau_t or tau_s), _probs(student.double(), tau_s)
    if name == "fkl":
        return _ref_kl(p, q)
    if name == "rkl":
        return _ref_kl(q, p)
    if name == "jsd":
        b = params.get("beta", 0.5)
        m = b * p + (1 - b) * q
        return b * _ref_kl(p, m) + (1 - b) * _ref_kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        a = params.get("alpha", 0.1)
        return _ref_kl(p, a * p + (1 - a) * q)
    if name == "srkl":
        a = params.get("alpha", 0.1)
        return _ref_kl(q, (1 - a) * p + a * q)
    if name == "akl":
        w = torch.from_numpy(_akl_weights(p.detach().numpy(), q.detach().numpy(), params.get("mu", 0.5)))
        return w * _ref_kl(p, q) + (1 - w) * _ref_kl(q, p)
    if name == "ab":
        return _ref_ab(p, q, params.get("alpha", 0.2), params.get("beta", 0.7))
    raise AssertionError(name)


def _logits(seed: int, shape=(3, 5, 11), scale=3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g), scale * torch.randn(shape, generator=g)


def _grad(fn, student: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of fn(student) and the gradient of sum(weights * values) w.r.t. student (per-position check)."""
    x = student.detach().clone().requires_grad_(True)
    values = fn(x)
    (grad,) = torch.autograd.grad((values * weights).sum(), x)
    return values.detach(), grad


# ---------------------------------------------------------------------------------------------------------
# values and gradients vs the reference


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@FAST
@given(seed=st.integers(0, 2**31 - 1), tau=st.sampled_from(TAUS), scale=st.sampled_from([0.3, 2.0, 6.0]))
@example(seed=23960466, tau=4.0, scale=0.3)   # a TVD row with p ~ q at a token: float32 and float64 on the kink
def test_matches_float64_reference(name, params, seed, tau, scale):
    s, t = _logits(seed, scale=scale)
    w = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(seed + 1))
    got, got_grad = _grad(lambda x: divergence_per_token(name, x, t, tau=tau, **params), s, w)
    want, want_grad = _grad(lambda x: reference(name, x, t, tau, **params), s.double(), w.double())
    assert got.dtype == torch.float32 and got.shape == s.shape[:-1]
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-5)
    rows = _smooth_rows(name, s, t, tau)
    torch.testing.assert_close(got_grad.double()[rows], want_grad[rows], rtol=2e-4, atol=2e-5)


def _smooth_rows(name: str, student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """The positions where the divergence is differentiable to float32's precision. TVD is |p - q| summed: where
    some token has p ~ q (a flat student and teacher at a high tau), float32 and float64 may take the kink's two
    sides and their gradients legitimately differ; every other objective is smooth everywhere."""
    if name != "tvd":
        return torch.ones(student.shape[:-1], dtype=torch.bool)
    gap = (_probs(teacher.double(), tau) - _probs(student.double(), tau)).abs().amin(-1)
    return gap > 1e-5


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tau", TAUS)
def test_tau_target_teacher_softens_only_teacher(name, tau):
    s, t = _logits(7)
    mask = torch.ones(s.shape[:-1], dtype=torch.bool)
    got = distillation_loss(s, t, mask, divergence=name, tau=tau, tau_target="teacher", tau_squared=False)
    want = reference(name, s, t, 1.0, tau).mean()
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@FAST
@given(seed=st.integers(0, 2**31 - 1), tau=st.sampled_from(TAUS), scale=st.sampled_from([0.3, 3.0, 10.0]))
def test_zero_on_equal_and_nonnegative(name, params, seed, tau, scale):
    s, t = _logits(seed, scale=scale)
    same = divergence_per_token(name, t, t.clone(), tau=tau, **params)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-5)
    assert (divergence_per_token(name, s, t, tau=tau, **params) >= -1e-5).all()


@FAST
@given(seed=st.integers(0, 2**31 - 1), tau=st.sampled_from(TAUS))
def test_special_cases_reduce_to_kl(seed, tau):
    s, t = _logits(seed)
    fkl = divergence_per_token("fkl", s, t, tau=tau)
    rkl = divergence_per_token("rkl", s, t, tau=tau)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(divergence_per_token("ab", s, t, tau=tau, alpha=1.0, beta=0.0), fkl, **close)
    torch.testing.assert_close(divergence_per_token("ab", s, t, tau=tau, alpha=0.0, beta=1.0), rkl, **close)
    torch.testing.assert_close(divergence_per_token("skl", s, t, tau=tau, alpha=0.0), fkl, **close)
    torch.testing.assert_close(divergence_per_token("srkl", s, t, tau=tau, alpha=0.0), rkl, **close)


@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.0), (1.0, 0.0), (2.0, 0.0), (0.0, 0.4), (0.0, 1.0), (0.0, 1.7)])
def test_ab_limits_are_continuous(alpha, beta):
    """The beta=0 / alpha=0 branches equal the general float64 formula approached from nearby parameters."""
    s, t = _logits(3, scale=2.0)
    p, q = _probs(t.double(), 1.0), _probs(s.double(), 1.0)
    eps = 1e-6
    near = _ref_ab(p, q, alpha + (eps if alpha == 0 else 0), beta + (eps if beta == 0 else 0))
    got = divergence_per_token("ab", s, t, alpha=alpha, beta=beta)
    torch.testing.assert_close(got.double(), near, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tau", TAUS)
def test_fkl_gradient_is_q_minus_p_over_tau(tau):
    s, t = _logits(11)
    x = s.clone().requires_grad_(True)
    divergence_per_token("fkl", x, t, tau=tau).sum().backward()
    want = (torch.softmax(s / tau, -1) - torch.softmax(t / tau, -1)) / tau
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau_squared", [True, False])
def test_loss_is_masked_mean_times_tau_squared(tau_squared):
    s, t = _logits(5)
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(0)) > 0.4
    got = distillation_loss(s, t, mask, divergence="jsd", tau=2.0, tau_squared=tau_squared)
    want = reference("jsd", s, t, 2.0)[mask].mean() * (4.0 if tau_squared else 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# numerics: -inf, huge logits, bf16, empty masks, accumulation


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_neg_inf_entries_lie_outside_the_support(name, params, tau):
    s, t = _logits(13, shape=(2, 4, 9))
    s, t = s.clone(), t.clone()
    s[..., 7:] = -math.inf  # padded columns on both sides
    t[..., 7:] = -math.inf
    s[0, 1, 2] = -math.inf  # student-only -inf: the entry leaves the common support
    t[1, 2, 4] = -math.inf  # teacher-only -inf
    w = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(2))
    got, grad = _grad(lambda x: divergence_per_token(name, x, t, tau=tau, **params), s, w)
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()
    assert (grad[..., 7:] == 0).all() and grad[0, 1, 2] == 0 and grad[1, 2, 4] == 0
    # Reference: each position restricted to its common support (renormalised there).
    for i in range(2):
        for j in range(4):
            keep = torch.isfinite(s[i, j]) & torch.isfinite(t[i, j])
            sv = s[i, j, keep].clone().requires_grad_(True)
            want = reference(name, sv.double(), t[i, j, keep].double(), tau, **params)
            (want_grad,) = torch.autograd.grad(want * w[i, j], sv)
            torch.testing.assert_close(got[i, j].double(), want, rtol=2e-4, atol=2e-5)
            torch.testing.assert_close(grad[i, j, keep], want_grad.float(), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_no_common_support_and_all_inf_rows_give_zero(name):
    s = torch.tensor([[0.0, -math.inf, 1.0], [-math.inf] * 3])
    t = torch.tensor([[-math.inf, 2.0, -math.inf], [0.5, 1.0, 2.0]])
    x = s.clone().requires_grad_(True)
    values = divergence_per_token(name, x, t)
    values.sum().backward()
    assert (values == 0).all() and (x.grad == 0).all()


# Negative ab exponents blow up on vanishing probabilities by definition, so they are left out here.
BOUNDED_CASES = [(n, p) for n, p in CASES if min(p.values(), default=0) >= 0]


@pytest.mark.parametrize(("name", "params"), BOUNDED_CASES)
@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_huge_logits_stay_finite(name, params, tau):
    s, t = _logits(17, scale=1.0)
    s, t = (s * 1e4).clone(), (t * 1e4).clone()
    s[0, 0, 3] = -math.inf
    mask = torch.ones(s.shape[:-1], dtype=torch.bool)
    x = s.clone().requires_grad_(True)
    values = divergence_per_token(name, x, t, tau=tau, **params)
    distillation_loss(x, t, mask, divergence=name, tau=tau, **params).backward()
    assert torch.isfinite(values).all() and (values >= -1e-3).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_upcast(name, dtype):
    s, t = _logits(19)
    s, t = s.to(dtype), t.to(dtype)
    x = s.clone().requires_grad_(True)
    got = divergence_per_token(name, x, t, tau=2.0)
    got.sum().backward()
    assert got.dtype == torch.float32 and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    want = reference(name, s.float(), t.float(), 2.0)  # same rounded logits, computed in float64
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("num_tokens", [None, 0, torch.tensor(0)])
def test_all_masked_batch_gives_zero_and_zero_grad(name, num_tokens):
    s, t = _logits(23)
    s[0, 0, 0] = math.nan  # garbage at masked positions must not leak
    x = s.clone().requires_grad_(True)
    mask = torch.zeros(s.shape[:-1], dtype=torch.bool)
    if num_tokens == 0 and not isinstance(num_tokens, torch.Tensor):
        num_tokens = None  # a plain 0 is rejected (see test_bad_inputs); None is the local count 0
    loss = distillation_loss(x, t, mask, divergence=name, tau=2.0, num_tokens=num_tokens)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_micro_batches_with_global_count_equal_one_batch(name):
    s, t = _logits(29, shape=(4, 6, 13))
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(1)) > 0.5
    mask[0] = False  # uneven split: micro-batch means would differ from the global mean
    x = s.clone().requires_grad_(True)
    whole = distillation_loss(x, t, mask, divergence=name, tau=2.0)
    whole.backward()
    grad_whole = x.grad.clone()
    x.grad = None
    n = int(mask.sum())
    parts = [
        distillation_loss(x[sl], t[sl], mask[sl], divergence=name, tau=2.0, num_tokens=count)
        for sl, count in [(slice(0, 2), n), (slice(2, 4), torch.tensor(n))]
    ]
    sum(parts).backward()
    torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, grad_whole, rtol=1e-6, atol=1e-8)


def test_integer_mask_is_accepted():
    s, t = _logits(31)
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(3)) > 0.5
    a = distillation_loss(s, t, mask, divergence="fkl", tau=1.0)
    b = distillation_loss(s, t, mask.long(), divergence="fkl", tau=1.0)
    assert a.item() == b.item()


def test_kl_at_tau1_returns_exact_sums():
    s, t = _logits(37)
    s = s.requires_grad_(True)
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(4)) > 0.3
    out = kl_at_tau1(s, t, mask)
    assert set(out) == {"fkl", "rkl", "tokens"}
    assert out["tokens"].item() == int(mask.sum()) and out["tokens"].dtype == torch.int64
    for key in ("fkl", "rkl"):
        assert out[key].dtype == torch.float32 and not out[key].requires_grad
        want = reference(key, s.detach(), t, 1.0)[mask].sum()
        torch.testing.assert_close(out[key].double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# vocabulary rule


@pytest.fixture
def fresh_vocab_warning(monkeypatch):
    monkeypatch.setattr(losses, "_VOCAB_WARNED", False)


def test_teacher_padding_columns_are_dropped_silently(fresh_vocab_warning):
    s, t = _logits(41)
    t_wide = torch.cat([t, torch.full((*t.shape[:-1], 5), -math.inf)], -1)
    t_wide[..., -1] = -30.0  # ~1e-13 mass: below the threshold
    mask = torch.ones(s.shape[:-1], dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = distillation_loss(s, t_wide, mask, divergence="rkl", tau=2.0)
    torch.testing.assert_close(got, distillation_loss(s, t, mask, divergence="rkl", tau=2.0))
    a, b = align_vocab(s, t_wide)
    assert a is s and b.shape == s.shape


def test_teacher_columns_with_mass_warn_once(fresh_vocab_warning):
    s, t = _logits(43)
    t_wide = torch.cat([t, torch.full((*t.shape[:-1], 3), 5.0)], -1)
    with pytest.warns(RuntimeWarning, match="wider than the student"):
        got = divergence_per_token("fkl", s, t_wide)
    torch.testing.assert_close(got, divergence_per_token("fkl", s, t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        divergence_per_token("fkl", s, t_wide)  # second time: silent


@pytest.mark.parametrize(("s_shape", "t_shape"), [((2, 3, 8), (2, 3, 7)), ((2, 3, 8), (2, 4, 8)), ((2, 8), (2, 3, 8))])
def test_other_shape_mismatches_raise(s_shape, t_shape):
    with pytest.raises(ValueError, match=rf"student logits \({s_shape[0]}, .*teacher logits \({t_shape[0]}, "):
        divergence_per_token("fkl", torch.zeros(s_shape), torch.zeros(t_shape))
    with pytest.raises(ValueError, match="do not match"):
        distillation_loss(torch.zeros(s_shape), torch.zeros(t_shape), torch.ones(s_shape[:-1], dtype=torch.bool),
                          divergence="fkl", tau=1.0)


# ---------------------------------------------------------------------------------------------------------
# bad input


BAD_KWARGS = [
    (dict(divergence="kl"), r"unknown divergence 'kl'; valid names: fkl, rkl, jsd, tvd, skl, srkl, akl, ab"),
    (dict(tau=0.0), r"tau must be a finite number > 0, got 0.0"),
    (dict(tau=-1), r"tau must be a finite number > 0, got -1"),
    (dict(tau=math.nan), r"tau must be a finite number > 0, got nan"),
    (dict(tau=math.inf), r"tau must be a finite number > 0, got inf"),
    (dict(tau_target="student"), r"unknown tau_target 'student'; allowed: both, teacher"),
    (dict(divergence="jsd", beta=1.0), r"jsd: beta=1.0 is out of range; allowed: 0 < beta < 1"),
    (dict(divergence="jsd", beta=0.0), r"jsd: beta=0.0 is out of range"),
    (dict(divergence="skl", alpha=1.0), r"skl: alpha=1.0 is out of range; allowed: 0 <= alpha < 1"),
    (dict(divergence="srkl", alpha=-0.1), r"srkl: alpha=-0.1 is out of range"),
    (dict(divergence="akl", mu=1.5), r"akl: mu=1.5 is out of range; allowed: 0 <= mu <= 1"),
    (dict(divergence="ab", alpha=0.5, beta=-0.5), r"ab: alpha \+ beta must not be 0"),
    (dict(divergence="ab", alpha=math.nan), r"ab: alpha=nan is out of range; allowed: any finite real"),
    (dict(divergence="jsd", beta="0.5"), r"jsd: beta='0.5' is out of range"),
    (dict(divergence="fkl", beta=0.5), r"fkl: unknown param\(s\) beta; allowed: none"),
    (dict(divergence="jsd", alpha=0.5), r"jsd: unknown param\(s\) alpha; allowed: beta"),
    (dict(num_tokens=0), r"num_tokens must be a number > 0 or a scalar tensor, got 0"),
    (dict(tau_squared="yes"), r"tau_squared must be a bool, got 'yes'"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_KWARGS)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    s, t = _logits(47)
    mask = torch.ones(s.shape[:-1], dtype=torch.bool)
    call = dict(divergence="fkl", tau=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        distillation_loss(s, t, mask, **call)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(3, 4, dtype=torch.bool), r"mask shape \(3, 4\) must equal .* \(3, 5\)"),
        (torch.ones(3, 5), r"mask must be a bool or integer tensor, got torch.float32"),
        ([[True] * 5] * 3, r"mask must be a bool or integer tensor, got <class 'list'>"),
    ],
)
def test_bad_masks_raise(mask, match):
    s, t = _logits(53)
    with pytest.raises(ValueError, match=match):
        distillation_loss(s, t, mask, divergence="fkl", tau=1.0)


def test_per_token_rejects_bad_names_and_params():
    s, t = _logits(59)
    with pytest.raises(ValueError, match="unknown divergence 'FKL'; valid names: fkl"):
        divergence_per_token("FKL", s, t)
    with pytest.raises(ValueError, match="tau must be a finite number > 0, got -2"):
        divergence_per_token("fkl", s, t, tau=-2)
    with pytest.raises(ValueError, match=r"ab: unknown param\(s\) gamma; allowed: alpha, beta"):
        divergence_per_token("ab", s, t, gamma=1.0)


# ---------------------------------------------------------------------------------------------------------
# configs


def test_divergence_configs_match_registry():
    conf_dir = Path(__file__).resolve().parents[2] / "conf" / "divergence"
    found = {}
    for path in sorted(conf_dir.glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        assert cfg["name"] == path.stem
        found[cfg.pop("name")] = cfg
    assert set(found) == set(DIVERGENCES)
    for name, params in found.items():
        assert losses.resolve_params(name, params) == losses._REGISTRY[name].defaults, name


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_akl_is_invariant_to_vocabulary_permutations_with_bf16_ties(mu, tau):
    # bf16 logits on a coarse grid: many tokens share a value, some exactly at the head boundary.
    g = torch.Generator().manual_seed(0)
    vocab = 64
    teacher = (torch.randint(0, 6, (8, 16, vocab), generator=g).float() / 2).to(torch.bfloat16)
    student = torch.randn(8, 16, vocab, generator=g).to(torch.bfloat16)
    base = divergence_per_token("akl", student, teacher, tau=tau, mu=mu)
    spread = 0.0
    for seed in range(5):
        perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
        permuted = divergence_per_token("akl", student[..., perm], teacher[..., perm], tau=tau, mu=mu)
        spread = max(spread, float(((permuted - base).abs() / base.abs().clamp_min(1e-6)).max()))
    assert spread < 1e-5, spread  # float summation order only (ties used to move tokens across the boundary)


def test_akl_head_holds_every_token_tied_at_the_boundary():
    # p = [0.4, 0.2, 0.2, 0.2], mu = 0.5: the head reaches mu at the second token; its two ties join it,
    # so the head is all four tokens and the whole gap weighs FKL (w_head = 1).
    p = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.3, 0.3, 0.3]])
    got = divergence_per_token("akl", q.log(), p.log(), tau=1.0, mu=0.5)
    fkl = (p * (p / q).log()).sum(-1)
    torch.testing.assert_close(got, fkl)
