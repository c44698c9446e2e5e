"""distill-pipeline: stage plans (where every stage lives, what runs where), then the demo recipe at smoke
size end to end, and a rerun that skips every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.sweep import pipeline as pipeline
from distill.sweep.demo import SCALES

CI = SCALES["ci"]["overrides"]
MINILLM = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "minillm_layout"


def test_every_recipe_dir_is_a_pipeline_recipe():
    assert {"demo", "gpt2-xl_gpt2", "gpt2-xl_gpt2-medium", "gpt2-xl_gpt2-large", "opt-2.7b_opt-1.3b",
            "opt-2.7b_opt-350m", "opt-2.7b_opt-125m", "qwen2.5-7b_qwen2.5-1.5b"} == set(pipeline.recipes())


@pytest.fixture(scope="module")
def gpt2_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    # the data must exist: a cell's identity includes its input files' fingerprints (distill.cell.fingerprints)
    return root, pipeline.plan("gpt2-xl_gpt2", root, [f"data.dir={MINILLM}", "hydra.launcher.partition=gpu"])


def test_plan_finds_every_stage_and_feeds_the_sft_exports_to_the_grid(gpt2_plan):
    from tests.conftest import compose

    tmp_path, stages = gpt2_plan
    teacher, student, distill = stages["teacher"], stages["student"], stages["distill"]
    assert teacher.run_dirs[0].parent == student.run_dirs[0].parent == tmp_path / "sft"
    assert teacher.run_dirs[0].name.startswith("sft-gpt2-xl-s0-") and student.run_dirs[0].name.startswith("sft-gpt2-s0-")
    assert f"model.teacher.path={teacher.export}" in distill.overrides
    assert f"model.student.path={student.export}" in distill.overrides
    assert len(distill.cells) == 7 * 5 * 3 and distill.sweep_dir == tmp_path / "gpt2-xl_gpt2"  # the paper's grid
    # a cell's identity includes the teacher's weights: its dir is known once the teacher SFT exported them
    assert distill.run_dirs == [None] * 105 and not distill.finished
    # the three GPT-2 recipes share the teacher's stage (one SFT, trained once)
    medium = compose(["recipe=gpt2-xl_gpt2-medium/teacher", f"paths.root={tmp_path}", f"data.dir={MINILLM}"])
    assert pipeline.locate(medium) == teacher.run_dirs[0]


def test_grid_overrides_replace_the_recipes_grid_key_by_key(tmp_path):
    cells = pipeline.plan("gpt2-xl_gpt2", tmp_path, [f"data.dir={MINILLM}"], grid=["divergence=fkl,rkl", "seed=0"])[
        "distill"].cells
    assert len(cells) == 2 * 5 and ["divergence=fkl", "tau=0.5", "seed=0"] in cells


def test_commands_local_one_after_the_other_slurm_one_array_for_both_sft_stages(gpt2_plan):
    _, stages = gpt2_plan
    local = pipeline.commands(stages, launcher="local", parallel=3, grid=[], hydra_overrides=[])
    assert [t for t, _ in local] == ["teacher", "student", "distill"]
    assert "-m" not in local[0][1][3:] and {"hydra/launcher=pool", "hydra.launcher.n_jobs=3"} <= set(local[2][1])
    slurm = pipeline.commands(stages, launcher="slurm", parallel=3, grid=["tau=1.0"],
                              hydra_overrides=["hydra.launcher.partition=gpu"])
    (title, sft), (_, grid) = slurm
    assert title == "teacher+student" and "recipe=gpt2-xl_gpt2/teacher,gpt2-xl_gpt2/student" in sft
    assert {"-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"data.dir={MINILLM}"} <= set(sft)
    assert {"-m", "hydra/launcher=slurm", "tau=1.0"} <= set(grid)
    assert "hydra.launcher.partition=gpu" not in stages["teacher"].overrides  # launcher keys only go to -m runs


def test_the_baseline_runs_beside_the_grid_in_a_pool_of_one(tmp_path):
    stages = {name: pipeline.StagePlan(name, [f"recipe=demo/{name}"], [[]], [None]) for name in
              ("teacher", "student", "distill", "baseline")}
    titles = {t: cmd for t, cmd in pipeline.commands(stages, launcher="local", parallel=2, grid=[], hydra_overrides=[])}
    assert {"hydra/launcher=pool", "hydra.launcher.n_jobs=2"} <= set(titles["distill"])
    assert {"hydra/launcher=pool", "hydra.launcher.n_jobs=1"} <= set(titles["baseline"])

    # Each fake stage waits for the other to have started: run one after the other, the first would time out.
    def waits_for(mine: str, other: str, rc: int, then_s: float = 0.0) -> list[str]:
        code = (f"import pathlib, sys, time; d = pathlib.Path({str(tmp_path)!r}); (d / {mine!r}).touch(); "
                f"t = time.time() + 60\nwhile not (d / {other!r}).exists():\n    time.sleep(0.05)\n"
                f"    if time.time() > t: sys.exit(3)\ntime.sleep({then_s}); sys.exit({rc})")
        return [sys.executable, "-c", code, "x"]

    logged: list[str] = []
    todo = [("distill", waits_for("grid", "base", 1, then_s=2.0)), ("baseline", waits_for("base", "grid", 0))]
    failure = pipeline._run_stages(todo, stages, logged.append)
    assert isinstance(failure, subprocess.CalledProcessError) and failure.returncode == 1  # the grid's own exit
    ends = [line for line in logged if line.startswith("== ") and " in " in line and "$" not in line]
    assert [e.split(" in ")[0] for e in ends] == ["== baseline: done", "== distill: failed (exit 1)"]  # as they came


def test_unknown_recipe_is_a_one_line_error(capsys):
    assert pipeline.main(["gpt5_gpt2", "--dry-run"]) == 2
    assert "unknown recipe 'gpt5_gpt2': choose one of demo, gpt2-xl_gpt2" in capsys.readouterr().err


@pytest.mark.slow
def test_scaled_down_pipeline_end_to_end_then_a_rerun_skips_every_stage(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distill.sweep.pipeline", "demo", "--root", str(tmp_path), *CI,
           "--grid", "divergence=fkl,rkl", "--grid", "tau=1.0", "--grid", "seed=0", "--baseline-grid", "seed=0"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    prep = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "demo-prep").glob("*/metrics.json")}
    assert sorted(n.rsplit("-", 1)[0] for n in prep) == ["sft-toy-2x64-s0", "sft-toy-4x64-s0"]  # teacher vs student
    cells = [json.loads(p.read_text()) for p in (tmp_path / "demo").glob("*/metrics.json")]
    assert {(m["cell"]["divergence"], m["name"]) for m in cells} == {
        ("fkl", "fkl-tau1-toy-2x64-s0"), ("rkl", "rkl-tau1-toy-2x64-s0"), ("sft", "sft-toy-2x64-s0")}  # + baseline
    teacher_dir = next(d for d in prep if d.startswith("sft-toy-4x64"))
    assert all(m["status"] == "completed" for m in cells)
    assert all(m["cell"]["teacher"] == str(tmp_path / "demo-prep" / teacher_dir / "student")
               for m in cells if m["cell"]["divergence"] != "sft")  # the grid found the teacher stage's export
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| fkl |" in report and "| sft |" in report

    logs = sorted(tmp_path.glob("*/*/train_log.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in logs} == before  # nothing trained again
    for stage in ("teacher", "student", "distill", "baseline"):
        assert f"== {stage}: every cell already completed, skipped" in second.stdout
    assert "$ distill-train" not in second.stdout  # no stage was even launched


def test_a_grid_started_as_the_pipeline_starts_it_logs_each_line_once(tmp_path):
    # distill-pipeline starts `python -m distill.train -m ...`. Its cells were pickled by value (as functions of
    # __main__), never imported distill.train, and wrote every line of their train.log twice.
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = pipeline.train_command(["experiment=smoke", f"paths.root={tmp_path}", "hydra/launcher=local", "logger=none",
                                  "trainer.max_steps=4", "trainer.log_every=1", "seed=0,1"], multirun=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted(tmp_path.glob("*/*/train.log"))
    assert len(logs) == 2
    for log in logs:
        lines = log.read_text().splitlines()
        assert sum("step 4/4" in line for line in lines) == 1, log.read_text()
        assert len(lines) == len(set(lines)), log.read_text()
