"""One optimizer step and its cadence (distill/train/step.py): which examples a step sees, exact accumulation,
a caller's own micro-batches, checkpoint and resume, the train log of a resumed cell."""

from pathlib import Path

import pytest
import torch

from distill.cell import fingerprints as inputs
from distill.cell.results import read_metrics
from distill.tracking import offline as wandb_offline
from distill.tracking import wandb_run as tracking
from distill.train import engine as eng
from distill.train import run
from distill.train.objective import EXAMPLE_IDS
from distill.train.prepare import setup
from distill.train.run import run_cell
from distill.train.selection import validate
from distill.train.step import sample_batches, sample_indices, train_step
from tests.train.conftest import weights


def test_sample_indices_cover_each_epoch_once_and_split_ranks():
    n, mbs, world, gas = 20, 2, 2, 1
    epoch = []
    for step in range(5):  # 5 steps x 4 examples = one epoch of 20
        for rank in range(world):
            epoch += sample_indices(n, step, 0, rank, world=world, micro_bs=mbs, grad_accum=gas, seed=7)
    assert sorted(epoch) == list(range(n))
    assert sample_indices(n, 3, 0, 1, world=2, micro_bs=2, grad_accum=1, seed=7) == \
        sample_indices(n, 3, 0, 1, world=2, micro_bs=2, grad_accum=1, seed=7)
    assert sample_indices(n, 5, 0, 0, world=2, micro_bs=2, grad_accum=1, seed=7) != \
        sample_indices(n, 0, 0, 0, world=2, micro_bs=2, grad_accum=1, seed=7)  # next epoch reshuffled


@pytest.mark.parametrize("n", [30, 32, 5])
def test_a_steps_examples_depend_on_the_global_batch_not_on_its_split(n):
    """The same examples in each step whether 8 = 8 x 1 x 1, 2 x 4 x 1, 4 x 1 x 2 or 1 x 2 x 4 (micro x accum x world)."""
    splits = [(8, 1, 1), (2, 4, 1), (4, 1, 2), (1, 2, 4)]
    for step in range(9):
        seen = []
        for micro_bs, accum, world in splits:
            ids = [i for m in range(accum) for r in range(world)
                   for i in sample_indices(n, step, m, r, world=world, micro_bs=micro_bs, grad_accum=accum, seed=3)]
            seen.append(sorted(ids))
        assert all(x == seen[0] for x in seen) and len(seen[0]) == 8
    if n >= 8:  # an epoch is n // 8 steps of distinct examples (the last partial batch dropped), then reshuffled
        per_epoch = n // 8
        epoch = [i for step in range(per_epoch) for i in sample_indices(n, step, 0, 0, world=1, micro_bs=8, grad_accum=1, seed=3)]
        assert len(set(epoch)) == per_epoch * 8


def test_gradient_accumulation_is_exact(smoke_cfg, tmp_path):
    one = run_cell(smoke_cfg("trainer.micro_batch_size=8", "trainer.grad_accum=1", "eval.max_examples=2"))
    two = run_cell(smoke_cfg("trainer.micro_batch_size=4", "trainer.grad_accum=2", "eval.max_examples=2",
                             f"paths.root={tmp_path}/acc"))
    assert two["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-4)
    w1, w2 = weights(Path(one["run_dir"])), weights(Path(two["run_dir"]))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


def test_kill_and_resume_equals_uninterrupted(smoke_cfg, tmp_path, monkeypatch):
    straight = run_cell(smoke_cfg("eval.max_examples=2", f"paths.root={tmp_path}/straight"))

    real_save = eng.save_checkpoint

    def save_then_die(engine, run_dir, step, client_state, keep):
        real_save(engine, run_dir, step, client_state, keep)
        raise RuntimeError(f"killed after checkpoint at step {step}")

    cfg = smoke_cfg("eval.max_examples=2", f"paths.root={tmp_path}/resumed")
    monkeypatch.setattr(eng, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed after checkpoint at step 3"):
        run_cell(cfg)
    assert read_metrics(inputs.locate(cfg)[0])["status"] == "failed"
    monkeypatch.setattr(eng, "save_checkpoint", real_save)
    resumed = run_cell(cfg)
    assert resumed["train"]["resumed_from_step"] == 3
    assert resumed["train"]["final_loss"] == pytest.approx(straight["train"]["final_loss"], rel=1e-5)
    w_a, w_b = weights(Path(straight["run_dir"])), weights(Path(resumed["run_dir"]))
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-5, atol=1e-6)


def test_train_step_takes_a_callers_micro_batches_like_its_own(smoke_cfg, tmp_path):
    own = setup(smoke_cfg("trainer.micro_batch_size=4", "trainer.grad_accum=2", f"paths.root={tmp_path}/own"))
    given = setup(smoke_cfg("trainer.micro_batch_size=4", "trainer.grad_accum=2", f"paths.root={tmp_path}/given"))
    laps: list[str] = []
    a = train_step(own, 0, lap=laps.append)
    # The same rows as plain collated batches, without example ids: what an on-policy loop would pass.
    batches = [{k: v for k, v in b.items() if k != EXAMPLE_IDS} for b in sample_batches(given, 0)]
    b = train_step(given, 0, batches)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"] > 0
    assert own.progress.step == given.progress.step == 1 and own.progress.tokens == a["tokens"]
    assert laps == ["data"] + ["forward", "loss", "backward", "step"] * 2  # the segments a benchmark times
    for p_own, p_given in zip(own.engine.module.parameters(), given.engine.module.parameters()):
        torch.testing.assert_close(p_own, p_given)
    with pytest.raises(ValueError, match=r"needs 2 micro-batches \(the schedule.s accumulation\), got 1"):
        train_step(given, 1, batches[:1])
    assert set(validate(own)) == {"ce", "fkl", "rkl"}


def test_wandb_run_of_a_resumed_cell_holds_every_step_once(smoke_cfg, monkeypatch):
    import wandb

    cfg = smoke_cfg("logger=wandb", "logger.mode=offline", "eval.max_examples=2", "sweep_name=wb")
    real_after_step = run.after_step

    def die_after_step_4(cell, result, *rest):   # step 4 is logged, the last checkpoint is at step 3
        real_after_step(cell, result, *rest)
        if result["step"] == 4:
            raise RuntimeError("killed after step 4")

    monkeypatch.setattr(run, "after_step", die_after_step_4)
    with pytest.raises(RuntimeError, match="killed after step 4"):
        run_cell(cfg)
    monkeypatch.setattr(run, "after_step", real_after_step)
    m = run_cell(cfg)                      # resumes at step 3, so it trains and logs step 4 again
    assert m["train"]["resumed_from_step"] == 3
    # In a process that already hosts a W&B service (earlier in-process runs of the suite), the
    # service may still be writing the finished run's records; teardown waits until they are on disk.
    wandb.teardown()
    rid = tracking.run_id("wb", m["name"], m["signature"])
    files = wandb_offline.run_files(Path(cfg.paths.sweep_dir), rid)   # the sweep's own W&B folder
    assert len(files) == 2

    def steps(key):
        return sorted(r["_step"] for f in files for r in wandb_offline.history_rows(f) if key in r)

    # synced, the two attempts append into one run: every metric at every step once
    assert steps("train/loss") == [2, 4, 6] and steps("valid/ce") == [3, 6] and steps("eval/test/rougeL") == [6]
    info, config = wandb_offline.run_info(files[-1])
    assert (info["job_type"], info["group"]) == ("distill", "wb") and config["tau"] == 1.0
    summary = wandb_offline.final_summary(files[-1])
    assert summary["eval/test/rougeL"] == pytest.approx(m["eval"]["test"]["rougeL_mean"])
    assert summary["valid/fkl"] == pytest.approx(m["valid"]["fkl"]) and summary["tau"] == 1.0
    assert summary["eval/test/generations"]["_type"] == "table-file" and summary["train/steps"] == 6
    assert not [k for k in summary if "." in k]
