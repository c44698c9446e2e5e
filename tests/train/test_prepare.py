"""Before the first step (distill/train/prepare.py): a failure in setup is recorded; a pretrained teacher and a
warm-started student from an earlier cell's export."""

import json
from pathlib import Path

import pytest

from distill import models
from distill.train.run import run_cell


def test_a_failure_in_setup_is_recorded(smoke_cfg, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no such architecture")

    monkeypatch.setattr(models, "build_model", broken)
    cfg = smoke_cfg()
    with pytest.raises(RuntimeError, match="no such architecture"):
        run_cell(cfg)
    [metrics_file] = Path(cfg.paths.sweep_dir).glob("*/metrics.json")  # the cell dir also names its inputs
    m = json.loads(metrics_file.read_text())
    assert m["status"] == "failed" and m["error"] == "RuntimeError: no such architecture"


def test_pretrained_teacher_and_warm_start_from_a_previous_cell(smoke_cfg, tmp_path):
    teacher = run_cell(smoke_cfg("experiment=[smoke,teacher]", "eval.max_examples=2", f"paths.root={tmp_path}/t"))
    t_dir = Path(teacher["run_dir"]) / "student"
    m = run_cell(smoke_cfg(f"model.teacher.path={t_dir}", "model.teacher.allow_random=false",
                           f"model.student.path={t_dir}", "eval.max_examples=2", "trainer.log_every=1"))
    assert m["status"] == "completed" and m["cell"]["teacher"] == str(t_dir)
    # Student == teacher when loaded: the first step's distillation loss is zero.
    first = json.loads((Path(m["run_dir"]) / "train_log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["train/kd"] < 1e-6
