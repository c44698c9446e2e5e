"""The cell's run, in-process on tiny models: one cell end to end, skip, ZeRO stages, bf16, torchrun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.cell import fingerprints as inputs
from distill.cell import identity as runs
from distill.cell.results import read_metrics
from distill.train import engine as eng
from distill.train.run import run_cell
from tests.conftest import compose
from tests.train.conftest import child_env, weights


def test_smoke_cell_end_to_end(smoke_cfg):
    cfg = smoke_cfg("divergence=rkl", "tau=2")
    m = run_cell(cfg)
    d, fps = inputs.locate(cfg)
    assert m["status"] == "completed" and read_metrics(d) == json.loads(json.dumps(m))
    assert m["cell"]["divergence"] == "rkl" and m["cell"]["tau"] == 2.0
    assert m["cell"]["max_steps"] == 6   # the budget is part of what a report compares
    assert m["signature"] == runs.signature(cfg, inputs=fps) and m["config_signature"] == runs.signature(cfg)
    assert m["inputs"] == fps and set(fps) == {"data.embedded"} and m["host"] and m["pid"]
    assert [a["status"] for a in m["attempts"]] == ["completed"] and m["attempts"][0]["start_step"] == 0
    assert m["train"]["attempts"] == 1
    log = (d / "train.log").read_text()
    assert "step 6/6 loss" in log and log.count(" loss ") >= 3  # the cell's own log, with its loss lines
    assert m["train"]["steps"] == 6 and m["train"]["tokens"] > 0 and m["train"]["tokens_per_s"] > 0
    assert set(m["eval"]) == set(cfg.data.benchmarks)
    for result in m["eval"].values():
        assert 0.0 <= result["rougeL_mean"] <= 100.0 and len(result["rougeL_per_seed"]) == 1
    assert {"ce", "fkl", "rkl"} <= set(m["valid"]) and m["valid"]["fkl"] >= 0
    assert (d / "student" / "model.safetensors").exists() and (d / "config.yaml").exists()
    assert (d / "train_log.jsonl").read_text().count("train/loss") >= 3
    assert not (d / eng.CKPT_DIR).exists()  # optimizer state dropped once the student is exported


def test_finished_cell_is_skipped_and_force_reruns(smoke_cfg, monkeypatch):
    cfg = smoke_cfg()
    first = run_cell(cfg)

    def no_training(*a, **k):
        raise AssertionError("a completed cell must not train again")

    monkeypatch.setattr(eng, "initialize", no_training)
    assert run_cell(cfg) == json.loads(json.dumps(first))
    with pytest.raises(AssertionError, match="must not train again"):
        run_cell(smoke_cfg("force=true"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_like_stage_0(stage, smoke_cfg, tmp_path):
    ref = run_cell(smoke_cfg("trainer.zero_stage=0", "eval.max_examples=2"))
    m = run_cell(smoke_cfg(f"trainer.zero_stage={stage}", "eval.max_examples=2", f"paths.root={tmp_path}/z{stage}"))
    assert m["status"] == "completed"
    assert m["train"]["final_loss"] == pytest.approx(ref["train"]["final_loss"], rel=1e-4)


def test_bf16_cell_runs(smoke_cfg):
    m = run_cell(smoke_cfg("trainer.precision=bf16", "eval.max_examples=2"))
    assert m["status"] == "completed" and m["train"]["final_loss"] == m["train"]["final_loss"]  # not NaN


@pytest.mark.slow
def test_two_process_torchrun_zero3(tmp_path, data_root):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distill.train",
           "experiment=smoke", "trainer.zero_stage=3", "trainer.micro_batch_size=4", "eval.max_examples=2",
           f"paths.root={tmp_path}", f"paths.data_dir={data_root}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [metrics_file] = list(tmp_path.glob("adhoc/*/metrics.json"))
    m = json.loads(metrics_file.read_text())
    assert m["status"] == "completed" and m["train"]["tokens"] > 0
    assert (metrics_file.parent / "student" / "model.safetensors").exists()


@pytest.mark.slow
def test_global_batch_is_the_same_on_one_and_two_processes(tmp_path, data_root):
    """One global batch of 8, split 2 x 4 on one process and 2 x 2 x 2 ranks under torchrun: the same cell
    (signature, dir), the same examples and tokens per step, the same trained weights."""
    common = ["experiment=smoke", "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "eval.max_examples=2",
              f"paths.data_dir={data_root}"]
    one = run_cell(compose([*common, f"paths.root={tmp_path}/one"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distill.train",
           *common, f"paths.root={tmp_path}/two"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [metrics_file] = list((tmp_path / "two").glob("adhoc/*/metrics.json"))
    two = json.loads(metrics_file.read_text())
    assert two["signature"] == one["signature"] and metrics_file.parent.name == Path(one["run_dir"]).name
    assert (one["train"]["world_size"], one["train"]["grad_accum"], two["train"]["world_size"], two["train"]["grad_accum"]) \
        == (1, 4, 2, 2)
    for m in (one, two):
        assert (m["train"]["global_batch_size"], m["train"]["micro_batch_size"]) == (8, 2)
    assert two["train"]["tokens"] == one["train"]["tokens"]  # the same examples, step by step
    w_one, w_two = weights(Path(one["run_dir"])), weights(metrics_file.parent)
    for k in w_one:
        torch.testing.assert_close(w_one[k], w_two[k], rtol=1e-4, atol=1e-5)
