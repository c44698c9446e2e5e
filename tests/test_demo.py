"""The main job at smoke size: every stage, every cell, the SFT baseline, the report; then a second run that trains nothing."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_scaled_down_demo_end_to_end_then_cached(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "distill.demo", "--scale", "ci", "--root", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    cells = sorted((tmp_path / "demo").glob("*/metrics.json"))
    metrics = [json.loads(p.read_text()) for p in cells]
    distilled = [m for m in metrics if m["cell"]["divergence"] != "sft"]
    grid = {(m["cell"]["divergence"], m["cell"]["tau"]) for m in distilled}
    assert grid == {(d, t) for d in ("fkl", "rkl", "jsd") for t in (1.0, 2.0)}
    assert all(m["status"] == "completed" for m in metrics)
    # Distillation cells read the prep stages' teacher and warm start.
    prep = {p.parent.name for p in (tmp_path / "demo-prep").glob("*/metrics.json")}
    assert len(prep) == 2 and all(m["cell"]["teacher"].endswith("/student") for m in distilled)
    # The fair baseline: SFT continued from the same warm start, same steps, one cell per seed.
    (sft,) = [m for m in metrics if m["cell"]["divergence"] == "sft"]
    assert sft["cell"]["kd_ratio"] == 0.0 and sft["cell"]["teacher"] is None
    assert sft["cell"]["student"] == distilled[0]["cell"]["student"]
    assert sft["train"]["steps"] == distilled[0]["train"]["steps"]
    report = (tmp_path / "demo" / "report.md").read_text()
    for div in ("sft", "fkl", "rkl", "jsd"):
        assert f"| {div} |" in report
    assert "| fkl − sft (objective − SFT" in report   # "; best − second" may follow
    assert "FKL − RKL" in report and (tmp_path / "demo" / "report.png").stat().st_size > 10_000
    assert "distill-demo finished" in first.stdout

    logs = sorted((tmp_path).glob("*/*/train_log.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in logs} == before  # nothing trained again
    assert second.stdout.count("already completed") + second.stderr.count("already completed") >= 2
