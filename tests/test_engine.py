"""distill/engine.py: the learning-rate schedule (transformers' warmup + cosine) against the hand-written one
it replaced, step by step."""

import math
import pickle

import pytest
import torch

from distill.engine import lr_schedule


def hand_written_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The schedule the job used before it took transformers' (distill/engine.py up to issue 11), verbatim."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lrs(warmup: int, steps: int, min_ratio: float, peak: float = 1e-3) -> list[float]:
    """The learning rate each optimizer step trains with (LambdaLR is stepped after every step, as DeepSpeed does)."""
    opt = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=peak)
    sched = lr_schedule(opt, warmup, steps, min_ratio)
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup, steps, min_ratio", [
    (20, 300, 0.1),   # trainer=cpu
    (100, 300, 0.1),  # trainer=gpu's warmup
    (10, 150, 0.1),   # experiment=demo
    (40, 800, 0.1),   # demo_teacher
    (20, 300, 0.1),   # demo_student
    (1, 6, 0.1),      # experiment=smoke
    (0, 50, 0.0),     # no warmup, decay to zero
    (5, 5, 0.3),      # warmup as long as training
    (7, 33, 0.25),
])
def test_schedule_equals_the_hand_written_curve_at_every_step(warmup, steps, min_ratio):
    peak = 1e-3
    expected = [peak * hand_written_factor(s, warmup, steps, min_ratio) for s in range(steps + 1)]
    got = lrs(warmup, steps, min_ratio, peak)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    if warmup:
        assert got[0] == pytest.approx(peak / warmup) and got[warmup - 1] == pytest.approx(peak)  # no step at lr 0
    if steps > warmup:
        assert got[steps] == pytest.approx(peak * min_ratio, rel=1e-12)  # decayed to the floor at the end


def test_the_demo_schedules_are_bit_identical():
    # The demo's results must not move: equal floats, not just close ones, for the configs it trains with.
    for warmup, steps in ((10, 150), (40, 800), (20, 300), (1, 6)):
        assert lrs(warmup, steps, 0.1) == [1e-3 * hand_written_factor(s, warmup, steps, 0.1) for s in range(steps + 1)]


def test_schedule_state_survives_a_checkpoint():
    opt = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1.0)
    sched = lr_schedule(opt, 3, 10, 0.1)
    for _ in range(4):
        opt.step()
        sched.step()
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    opt2 = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1.0)
    resumed = lr_schedule(opt2, 3, 10, 0.1)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == sched.get_last_lr()
