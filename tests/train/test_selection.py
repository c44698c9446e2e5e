"""Checkpoint selection (distill/train/selection.py): by dev loss, by dev ROUGE-L, across a kill and resume."""

from pathlib import Path

import pytest
import torch

from distill.train import engine as eng
from distill.train import selection
from distill.train.run import run_cell
from tests.train.conftest import weights


SELECT = ["trainer.select=loss", "trainer.eval_every=2", "trainer.ckpt_every=2", "eval.max_examples=2"]


def _dev_losses(monkeypatch, by_step: dict[int, float]) -> None:
    """Crafted dev losses per evaluation step, so which checkpoint wins is known in advance."""
    monkeypatch.setattr(selection, "validate", lambda cell: {"ce": by_step[cell.progress.step]})


def test_selection_by_dev_loss_exports_and_evaluates_the_best_evaluation(smoke_cfg, tmp_path, monkeypatch):
    _dev_losses(monkeypatch, {2: 0.5, 4: 0.9, 6: 0.8})
    m = run_cell(smoke_cfg(*SELECT, "trainer.keep_ckpts=5", "trainer.keep_final_ckpt=true"))
    d = Path(m["run_dir"])
    assert m["selection"]["by"] == "loss" and m["selection"]["step"] == 2 and m["selection"]["value"] == 0.5
    assert [e["step"] for e in m["selection"]["evaluations"]] == [2, 4, 6]
    assert m["valid"] == {"ce": 0.5}  # the selected checkpoint's validation, not the last one's
    # the exported (and evaluated) student is the model of step 2, not of step 6
    at_2 = torch.load(d / eng.CKPT_DIR / "step00000002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    at_4 = torch.load(d / eng.CKPT_DIR / "step00000004" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    student = weights(d)
    assert all(torch.equal(student[k], at_2[k].float()) for k in student)
    assert not all(torch.equal(student[k], at_4[k].float()) for k in student)
    assert not (d / selection.SELECTED_DIR).exists()


def test_selection_survives_kill_and_resume(smoke_cfg, tmp_path, monkeypatch):
    _dev_losses(monkeypatch, {2: 0.5, 4: 0.4, 6: 0.9})  # step 4 wins; the cell is killed right after it
    straight = run_cell(smoke_cfg(*SELECT, f"paths.root={tmp_path}/straight"))
    real_save = eng.save_checkpoint

    def save_then_die(engine, run_dir, step, client_state, keep):
        real_save(engine, run_dir, step, client_state, keep)
        if step == 4:
            raise RuntimeError("killed after checkpoint at step 4")

    cfg = smoke_cfg(*SELECT, f"paths.root={tmp_path}/resumed")
    monkeypatch.setattr(eng, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="step 4"):
        run_cell(cfg)
    monkeypatch.setattr(eng, "save_checkpoint", real_save)
    resumed = run_cell(cfg)
    assert resumed["train"]["resumed_from_step"] == 4 and resumed["selection"]["step"] == straight["selection"]["step"] == 4
    w_a, w_b = weights(Path(straight["run_dir"])), weights(Path(resumed["run_dir"]))
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-5, atol=1e-6)


def test_selection_by_dev_rouge_l_generates_on_the_validation_split(smoke_cfg):
    m = run_cell(smoke_cfg("trainer.select=rougeL", "trainer.select_examples=4", "trainer.eval_every=3",
                           "eval.max_examples=2"))
    evals = m["selection"]["evaluations"]
    assert [e["step"] for e in evals] == [3, 6] and all(0.0 <= e["select"] <= 100.0 for e in evals)
    best = max(evals, key=lambda e: e["select"])  # ties keep the earlier one
    assert m["selection"]["step"] == best["step"] and m["selection"]["value"] == best["select"]
