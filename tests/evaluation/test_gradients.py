"""Tests for distill/evaluation/gradients.py on constructed distributions whose answers are known analytically."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from distill.options import DIVERGENCES
from distill.evaluation import gradients as analyze
from distill.evaluation.gradients import (analyze_logits, gradient, parse_objectives, parse_taus, row_stats,
                             split_gradient, tail_mass, teacher_topk_mask)

TAUS = [0.5, 1.0, 2.0, 4.0, 8.0]


def peaked_teacher(n: int = 64, vocab: int = 50, peak: float = 6.0, seed: int = 0) -> torch.Tensor:
    """One dominant token (index 0) over a small, uniform-ish tail (standard normal logits)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, vocab, generator=g)
    t[:, 0] += peak
    return t


def by(rows, objective, key):
    return [r[key] for r in rows if r["objective"] == objective]


def strictly_increasing(xs) -> bool:
    return all(a < b for a, b in zip(xs, xs[1:]))


# ----------------------------------------------------------------------------- gradient + split

@pytest.mark.parametrize("tau", TAUS)
def test_fkl_gradient_is_q_minus_p_over_tau_and_splits_back(tau):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(32, 40, generator=g) * 2, torch.randn(32, 40, generator=g) * 3
    grad = gradient("fkl", s, t, tau)
    expected = (F.softmax(s / tau, -1) - F.softmax(t / tau, -1)) / tau
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)

    dominant = teacher_topk_mask(t, k=3)
    dom, rest = split_gradient(grad, dominant)
    assert torch.equal(dom + rest, grad)
    assert (dom[~dominant] == 0).all() and (rest[dominant] == 0).all()
    stats = row_stats(grad, dominant)
    assert ((stats["share"] >= 0) & (stats["share"] <= 1)).all()
    # energy shares of the two parts add up to one
    dom_sq = dom.norm(dim=-1) ** 2 / grad.norm(dim=-1) ** 2
    torch.testing.assert_close(stats["share_sq"] + dom_sq, torch.ones(32), rtol=1e-5, atol=1e-5)


def test_topk_mask_is_topk_of_p_at_every_tau():
    t = peaked_teacher(n=16, vocab=30)
    mask = teacher_topk_mask(t, k=4)
    assert (mask.sum(-1) == 4).all()
    for tau in TAUS:
        p = F.softmax(t / tau, -1)
        idx = p.topk(4, dim=-1).indices
        assert torch.equal(torch.zeros_like(mask).scatter_(-1, idx, True), mask)
        # tail mass = 1 - sum of top-k p_tau
        torch.testing.assert_close(tail_mass(t, mask, tau), 1 - p.gather(-1, idx).sum(-1), atol=1e-6, rtol=1e-5)


def test_zero_gradient_rows_are_left_out_of_shares():
    t = peaked_teacher(n=8)
    s = t.clone()
    s[:3] = 0.0  # three positions with a real gradient, five where the student equals the teacher
    (row,) = analyze_logits(s, t, objectives=["fkl"], taus=[2.0])
    assert row["n_zero"] == 5 and row["n_positions"] == 8
    expected = row_stats(gradient("fkl", s[:3], t[:3], 2.0), teacher_topk_mask(t[:3]), 2.0)["share"].mean()
    assert row["share"] == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- the mechanism

@pytest.mark.parametrize("student_noise", [0.0, 0.1])
def test_peaked_teacher_fkl_share_and_teacher_tail_grow_with_tau(student_noise):
    t = peaked_teacher()
    s = student_noise * torch.randn(t.shape, generator=torch.Generator().manual_seed(7))  # ~uniform student
    rows = analyze_logits(s, t, objectives=["fkl", "rkl"], taus=TAUS)
    assert len(rows) == 2 * len(TAUS)
    assert strictly_increasing(by(rows, "fkl", "share"))
    assert strictly_increasing(by(rows, "fkl", "share_sq"))
    assert strictly_increasing(by(rows, "fkl", "teacher_tail"))
    # not a small effect: the tail takes most of FKL's gradient only at high tau
    assert by(rows, "fkl", "share")[0] < 0.25 < 0.5 < by(rows, "fkl", "share")[-1]
    for r in rows:
        assert 0 <= r["share"] <= 1 and 0 <= r["teacher_tail"] <= 1 and 0 <= r["student_tail"] <= 1


def test_rkl_only_rescales_for_a_uniform_student():
    # q uniform: dRKL/dS_i = q_i (log q_i - log p_i - RKL) / tau = -(T_i - mean T) / (V tau^2),
    # a fixed direction scaled by 1/tau^2: share constant and tau^2 ||G|| = ||T - mean T|| / V.
    t = peaked_teacher()
    vocab = t.shape[1]
    rows = analyze_logits(torch.zeros_like(t), t, objectives=["rkl", "fkl"], taus=TAUS)
    shares = by(rows, "rkl", "share")
    assert max(shares) - min(shares) < 1e-4
    centered_norm = (t - t.mean(-1, keepdim=True)).norm(dim=-1).mean().item() / vocab
    for scaled in by(rows, "rkl", "grad_norm_tau2"):
        assert scaled == pytest.approx(centered_norm, rel=1e-3)
    # FKL on the same pair changes direction instead: its share moves a lot.
    fkl = by(rows, "fkl", "share")
    assert fkl[-1] - fkl[0] > 0.3


def test_direction_and_scale_rkl_rescaled_fkl_turned():
    """Uniform student, peaked teacher: RKL's G_tau = -(T - mean T) / (V tau^2) is G_1 / tau^2 (cos 1,
    ratio 1/tau^2, undone exactly by tau^2); FKL's (q - p_tau) / tau turns as p_tau flattens."""
    t = peaked_teacher()
    rows = analyze_logits(torch.zeros_like(t), t, objectives=["rkl", "fkl"], taus=TAUS)
    for r in rows:
        if r["objective"] == "rkl":
            assert r["cos_tau1"] == pytest.approx(1.0, abs=1e-5)
            assert r["norm_ratio"] == pytest.approx(r["tau"] ** -2, rel=1e-4)
            assert r["norm_ratio_tau2"] == pytest.approx(1.0, rel=1e-4)
    fkl = {r["tau"]: r for r in rows if r["objective"] == "fkl"}
    assert fkl[1.0]["cos_tau1"] == pytest.approx(1.0, abs=1e-6) and fkl[1.0]["norm_ratio"] == pytest.approx(1.0)
    u = torch.full_like(t, 1.0 / t.shape[1])
    for tau, r in fkl.items():   # G_tau is parallel to u - p_tau
        expected = F.cosine_similarity(u - F.softmax(t / tau, -1), u - F.softmax(t, -1), dim=-1).mean()
        assert r["cos_tau1"] == pytest.approx(expected.item(), rel=1e-4)
        if tau != 1.0:   # and not a 1/tau^2 rescale either
            assert abs(r["norm_ratio_tau2"] - 1.0) > 0.05
    cos = [fkl[t]["cos_tau1"] for t in (1.0, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] < 0.9   # turns further the higher tau goes
    assert fkl[0.5]["cos_tau1"] < 1 - 1e-3


def test_direction_stats_equal_a_direct_computation():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(20, 30, generator=g), torch.randn(20, 30, generator=g) * 2
    s[:4] = t[:4]   # four positions where the student equals the teacher: no direction at any tau
    (row,) = analyze_logits(s, t, objectives=["jsd"], taus=[3.0])
    g1, g3 = gradient("jsd", s[4:], t[4:], 1.0), gradient("jsd", s[4:], t[4:], 3.0)
    cos = (g1 * g3).sum(-1) / (g1.norm(dim=-1) * g3.norm(dim=-1))
    assert row["cos_tau1"] == pytest.approx(cos.mean().item(), rel=1e-5)
    assert row["norm_ratio"] == pytest.approx((g3.norm(dim=-1) / g1.norm(dim=-1)).median().item(), rel=1e-5)
    assert row["norm_ratio_tau2"] == pytest.approx(9 * row["norm_ratio"], rel=1e-9)
    # taus without 1 still compare with tau = 1
    (alone,) = analyze_logits(s, t, objectives=["jsd"], taus=[3.0])
    assert alone["cos_tau1"] == row["cos_tau1"]


def test_rkl_gradient_follows_student_mass_fkl_follows_teacher_mass():
    t = peaked_teacher(n=16)
    j = 5
    t[:, j] = t[:, 0] - 1.0  # a runner-up token the teacher gives real mass at every tau
    s = torch.zeros_like(t)
    s[:, j] = -2000.0  # the student puts ~0 mass there, even at tau = 8 (exp(-250))
    for tau in TAUS:
        p_j = F.softmax(t / tau, -1)[:, j]
        assert (p_j > 0.01).all()
        g_rkl = gradient("rkl", s, t, tau)
        g_fkl = gradient("fkl", s, t, tau)
        assert g_rkl[:, j].abs().max() < 1e-8
        torch.testing.assert_close(g_fkl[:, j], -p_j / tau, rtol=1e-4, atol=1e-7)
        # the other RKL components are far from zero: it is token j that is silenced
        assert g_rkl.abs().max() > 1e-4


def test_gradient_scale_with_and_without_tau_squared():
    t = peaked_teacher()
    s = torch.randn(t.shape, generator=torch.Generator().manual_seed(3))
    taus = [1.0, 8.0, 256.0, 1024.0]
    rows = analyze_logits(s, t, objectives=["fkl"], taus=taus)
    for r in rows:
        assert r["grad_norm_tau2"] == pytest.approx(r["tau"] ** 2 * r["grad_norm"], rel=1e-12)
    # Hinton's limit: (q - p)/tau ~ ((S - mean S) - (T - mean T)) / (V tau^2), so only the
    # tau^2-scaled norm converges (to ||centered(S - T)|| / V); the raw one falls as 1/tau^2.
    d = s - t
    limit = (d - d.mean(-1, keepdim=True)).norm(dim=-1).mean().item() / t.shape[1]
    scaled, raw = by(rows, "fkl", "grad_norm_tau2"), by(rows, "fkl", "grad_norm")
    assert scaled[-1] == pytest.approx(limit, rel=0.01)
    assert abs(scaled[-1] - limit) < abs(scaled[-2] - limit) < abs(scaled[1] - limit)
    assert raw[-1] / raw[-2] == pytest.approx(1 / 16, rel=0.01)


# ----------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("bad", ["0", "-1,2", "abc", "nan", "1,inf", ""])
def test_bad_taus_raise(bad):
    with pytest.raises(ValueError, match="tau"):
        parse_taus(bad)


def test_parsers_accept_good_input():
    assert parse_taus("0.5, 1,2") == [0.5, 1.0, 2.0]
    assert parse_objectives("fkl,rkl") == ["fkl", "rkl"]
    with pytest.raises(ValueError, match="unknown objective.*allowed"):
        parse_objectives("fkl,kl")
    with pytest.raises(ValueError, match="topk"):
        teacher_topk_mask(torch.zeros(2, 5), k=5)


def test_every_registered_divergence_gives_a_finite_table():
    t = peaked_teacher(n=8, vocab=20)
    s = torch.randn(t.shape, generator=torch.Generator().manual_seed(5))
    rows = analyze_logits(s, t, objectives=list(DIVERGENCES), taus=[0.5, 4.0], topk=2)
    assert len(rows) == 2 * len(DIVERGENCES)
    for r in rows:
        assert 0 <= r["share"] <= 1, r
        assert r["grad_norm"] > 0 and torch.isfinite(torch.tensor(r["grad_norm"])), r


# ----------------------------------------------------------------------------- the CLI end to end


def test_run_analysis_on_precomputed_logits_drops_a_padded_teacher_vocab(tmp_path):
    t = peaked_teacher(n=12, vocab=30)
    s = torch.randn(t.shape, generator=torch.Generator().manual_seed(9))
    padded = torch.cat([t, torch.full((12, 4), -1e4)], dim=-1)  # extra teacher columns with ~no mass
    rows = analyze.run_analysis(None, None, (s, padded), objectives=["fkl", "rkl"], taus=[1, 2], out_dir=tmp_path)
    assert rows == analyze_logits(s, t, objectives=["fkl", "rkl"], taus=[1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(analyze.OUTPUT_NAMES)
    with pytest.raises(ValueError, match="teacher and a student"):
        analyze.run_analysis(None, None, [{"input_ids": torch.zeros(1, 3, dtype=torch.long)}])
