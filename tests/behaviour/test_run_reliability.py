"""The cell's run under a hostile user: a heartbeat on a full disk, a holder paused and taken over, a
preemption during selection, export or evaluation, trainer.ckpt_every=0, a diverging loss, a garbage lock file.

Each test runs the real job on a tiny smoke cell, in-process where it can, as a CLI where the exit status and the
console are the point, and checks what lands on disk. No test waits on a clock: they synchronise on the
heartbeat thread, on files and on the job's own hooks.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from distill.cell import fingerprints as inputs
from distill.cell import lock as locks
from distill.cell.preemption import Interrupted
from distill.cell.results import METRICS_FILE, read_metrics
from distill.config import compose
from distill.evaluation import generate as evaluate
from distill.files import atomic_write_json, atomic_write_text
from distill.options import CellBusy, LockLost, TrainingDiverged
from distill.train import engine as eng
from distill.train import finish as finish_mod
from distill.train import run as train_mod
from distill.train import selection
from distill.train import step as step_mod
from distill.train.run import run_cell
from tests.behaviour.test_train_reliability import FAST, _cli, _log_records, _weights

ROUGE = {2: 30.0, 4: 10.0, 6: 20.0}  # crafted dev ROUGE-L per evaluation: step 2's student wins, not the last one
SELECT = [*FAST, "trainer.select=rougeL", "trainer.eval_every=2", "trainer.ckpt_every=4"]


@pytest.fixture(autouse=True)
def _not_under_slurm(monkeypatch):
    """The requeue message of a job outside SLURM, whatever the environment the tests run in."""
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)


def _crafted_rouge(monkeypatch) -> None:
    monkeypatch.setattr(selection, "dev_rouge_l", lambda cell: ROUGE[cell.progress.step])


_STRAIGHT: dict[str, dict] = {}  # name -> the metrics of an uninterrupted cell, run once per session


@pytest.fixture
def straight(tmp_path_factory, data_root) -> Callable[..., dict]:
    """`straight(name, *overrides, rouge=False)`: the uninterrupted cell the interrupted ones must end like, run
    by the first test that asks for it (inside that test, like any job of a test) and kept for the others."""

    def get(name: str, *overrides: str, rouge: bool = False) -> dict:
        if name not in _STRAIGHT:
            root = tmp_path_factory.mktemp("straight")
            with pytest.MonkeyPatch.context() as mp:
                if rouge:
                    _crafted_rouge(mp)
                _STRAIGHT[name] = run_cell(compose(["experiment=smoke", f"paths.root={root}",
                                                    f"paths.data_dir={data_root}", *overrides]))
        return _STRAIGHT[name]

    return get


def _take_over(cell: Path) -> str:
    """What a second run does once it judged this one dead: its own record in the lock, its own metrics.json."""
    other = locks.Holder.me(30.0, 300.0)
    other.host, other.pid = "node-b", 4242
    atomic_write_text(cell / locks.LOCK_FILE, other.to_json())
    atomic_write_json(cell / METRICS_FILE, {**read_metrics(cell), "host": "node-b", "status": "running"})
    return other.to_json()


def _files(cell: Path) -> dict[str, tuple[int, int]]:
    """Every file of the cell dir (size, mtime), the cell's own text log and temp names apart."""
    files = [p for p in sorted(cell.rglob("*")) if p.is_file() and p.name != "train.log"
             and not any(part.startswith(".") for part in p.relative_to(cell).parts)]
    return {str(p.relative_to(cell)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def _signalling(real: Callable, when: Callable[..., bool] = lambda *a, **k: True, *, before: bool = False) -> Callable:
    """`real` with SLURM's preemption landing in it: a SIGTERM to this process, once, at the first call for which
    `when(*args)` holds (after the call, or `before` it)."""
    sent: list[bool] = []

    def call(*a, **k):
        fire = not sent and when(*a, **k)
        if fire:
            sent.append(True)
        if fire and before:
            os.kill(os.getpid(), signal.SIGTERM)
        out = real(*a, **k)
        if fire and not before:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    return call


# ----------------------------------------------------------------------------------------------- 1. heartbeat
def test_a_heartbeat_that_cannot_be_written_past_stale_after_stops_the_run_at_its_next_step(smoke_cfg, monkeypatch):
    """The disk fills up in step 3 and stays full: the heartbeat retries, and once the record could be taken over
    (stale_after_s) the run stops at the end of that step with LockLost, writing nothing more."""
    cfg = smoke_cfg(*FAST, "trainer.log_every=1", "cell_lock.heartbeat_s=0.05", "cell_lock.stale_after_s=5")
    cell = inputs.locate(cfg)[0]
    full = threading.Event()
    real_write, real_step = locks.atomic_write_text, train_mod.train_step

    def write(path, text):
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, text)

    def step_on_a_full_disk(cell_, step, *a, **k):
        if step == 2:
            full.set()
            cell_.lock._thread.join(timeout=300)  # the heartbeat gives up: from now on anyone may take over
            assert cell_.lock.lost
        return real_step(cell_, step, *a, **k)

    monkeypatch.setattr(locks, "atomic_write_text", write)
    monkeypatch.setattr(train_mod, "train_step", step_on_a_full_disk)
    with pytest.raises(LockLost, match=r"its record could not be refreshed for \d+ s \(stale after 5 s\)\): stopped "
                                       r"before writing step 3, without writing"):
        run_cell(cfg)
    assert [r["step"] for r in _log_records(cell) if "train/loss" in r] == [1, 2]
    assert read_metrics(cell)["status"] == "running"  # not `failed` over what the next holder writes
    assert not (cell / eng.CKPT_DIR).exists()  # step 3's checkpoint (ckpt_every=3) was not written


# ----------------------------------------------------------------------------------------------- 2. taken over
def test_a_holder_taken_over_during_the_final_evaluation_writes_nothing_after_it(smoke_cfg, monkeypatch):
    """Paused (SIGSTOP) during the final evaluation and judged dead: after SIGCONT it completes nothing, keeps the
    checkpoints and the selected export, and adds no train-log line."""
    _crafted_rouge(monkeypatch)
    cfg = smoke_cfg(*SELECT)
    cell = inputs.locate(cfg)[0]
    seen: dict = {}
    real = evaluate.evaluate_benchmarks

    def evaluate_while_taken_over(*a, **k):
        out = real(*a, **k)
        seen["lock"] = _take_over(cell)
        seen["files"] = _files(cell)
        return out

    monkeypatch.setattr(evaluate, "evaluate_benchmarks", evaluate_while_taken_over)
    with pytest.raises(LockLost, match=r"node-b pid 4242, heartbeat \d+ s ago holds it now\): stopped before writing "
                                       r"the evaluation"):
        run_cell(cfg)
    assert _files(cell) == seen["files"]  # not one file written, replaced or removed
    assert read_metrics(cell)["host"] == "node-b" and read_metrics(cell)["status"] == "running"
    assert (cell / eng.CKPT_DIR / "step00000004").is_dir() and (cell / selection.SELECTED_DIR / "step00000002").is_dir()
    assert not (cell / "generations").exists()
    assert (cell / locks.LOCK_FILE).read_text() == seen["lock"]  # the new holder's lock stays
    assert [p.name for p in cell.iterdir() if p.name.startswith(".")] == []  # no temp left behind


@pytest.mark.parametrize("where", ["training", "validation"])
def test_a_holder_taken_over_during_training_stops_without_a_stray_line(where, smoke_cfg, monkeypatch):
    """Taken over in step 3 (or in its evaluation): no train-log line, no export, no checkpoint of step 3."""
    cfg = smoke_cfg(*FAST, "trainer.log_every=1", "trainer.select=loss")  # eval_every=3, ckpt_every=3
    cell = inputs.locate(cfg)[0]
    seen: dict = {}
    if where == "training":
        real_step = train_mod.train_step

        def step(cell_, i, *a, **k):
            if i == 2:
                seen["lock"], seen["files"] = _take_over(cell), _files(cell)
            return real_step(cell_, i, *a, **k)

        monkeypatch.setattr(train_mod, "train_step", step)
        expected = "stopped before writing step 3"
    else:
        real_validate = selection.validate

        def validate(cell_):
            out = real_validate(cell_)
            seen["lock"], seen["files"] = _take_over(cell), _files(cell)
            return out

        monkeypatch.setattr(selection, "validate", validate)
        expected = "stopped before exporting the evaluation of step 3"
    with pytest.raises(LockLost, match=expected):
        run_cell(cfg)
    assert _files(cell) == seen["files"]
    assert [r["step"] for r in _log_records(cell)] == ([1, 2] if where == "training" else [1, 2, 3])
    assert not any("valid/ce" in r for r in _log_records(cell))
    assert not (cell / eng.CKPT_DIR).exists() and not (cell / selection.SELECTED_DIR).exists()
    assert read_metrics(cell)["host"] == "node-b" and (cell / locks.LOCK_FILE).read_text() == seen["lock"]


# ----------------------------------------------------------------------------------------------- 3. preemption
def _interrupt(where: str, monkeypatch) -> None:
    """A SIGTERM once, at `where` of the cell's run (6 steps; with SELECT evaluations at 2, 4, 6, a checkpoint at 4)."""

    def final(cell) -> bool:  # the final evaluation's step
        return cell.progress.step == 6

    if where == "training":  # in step 3
        monkeypatch.setattr(train_mod, "train_step", _signalling(train_mod.train_step, lambda cell, i, *a, **k: i == 2))
    elif where == "validation":  # the first evaluation (SELECT: step 2's, which the selection keeps)
        monkeypatch.setattr(selection, "validate", _signalling(selection.validate))
    elif where == "final validation":
        monkeypatch.setattr(selection, "validate", _signalling(selection.validate, final))
    elif where == "selection":  # the dev ROUGE-L of the final evaluation
        monkeypatch.setattr(selection, "dev_rouge_l", _signalling(selection.dev_rouge_l, final))
    elif where == "export":  # right after the selected student was placed in student/
        monkeypatch.setattr(finish_mod, "_place_student", _signalling(finish_mod._place_student))
    else:  # the benchmark evaluation, the engine freed
        monkeypatch.setattr(evaluate, "evaluate_benchmarks", _signalling(evaluate.evaluate_benchmarks, before=True))


@pytest.mark.parametrize("where, resumed_from", [("training", 3), ("validation", 2), ("selection", 6), ("export", 6),
                                                 ("evaluation", 4)])
def test_a_preemption_anywhere_resumes_to_the_uninterrupted_cells_student_and_numbers(
        where, resumed_from, straight, smoke_cfg, tmp_path, monkeypatch, caplog):
    ref = straight("rougeL", *SELECT, rouge=True)
    assert ref["selection"]["step"] == 2  # an earlier step than the last won
    _crafted_rouge(monkeypatch)
    cfg = smoke_cfg(*SELECT, f"paths.root={tmp_path}/stopped")
    cell = inputs.locate(cfg)[0]
    with monkeypatch.context() as m:
        _interrupt(where, m)
        with pytest.raises(Interrupted):
            run_cell(cfg)
    assert read_metrics(cell)["status"] == "interrupted"
    assert (cell / selection.SELECTED_DIR / "step00000002" / "model.safetensors").is_file()  # the selected export
    caplog.clear()
    resumed = run_cell(cfg)
    assert "selection restarts" not in caplog.text
    assert resumed["train"]["resumed_from_step"] == resumed_from
    assert [a["status"] for a in resumed["attempts"]] == ["interrupted", "completed"]
    assert resumed["selection"] == ref["selection"]  # the same step, value and evaluations
    assert resumed["valid"] == ref["valid"] and resumed["eval"] == ref["eval"]
    ours, theirs = _weights(cell), _weights(Path(ref["run_dir"]))
    assert ours.keys() == theirs.keys()
    for k, w in theirs.items():
        torch.testing.assert_close(ours[k], w, rtol=0, atol=0)
    assert not (cell / eng.CKPT_DIR).exists() and not (cell / selection.SELECTED_DIR).exists()  # gone once completed


# ----------------------------------------------------------------------------------------------- 4. ckpt_every=0
@pytest.mark.parametrize("where, resumes_at", [("training", 3), ("final validation", 6), ("evaluation", 0)])
def test_with_ckpt_every_0_a_signal_checkpoints_and_the_console_says_where_the_rerun_starts(
        where, resumes_at, straight, smoke_cfg, tmp_path, monkeypatch, capsys):
    """ckpt_every=0: a signal in training or in the final evaluation still checkpoints (the rerun trains nothing
    twice); once the engine is freed there is nothing to save, and the console says the rerun starts over."""
    ref = straight("ckpt_every=0", *FAST, "trainer.ckpt_every=0")
    cfg = smoke_cfg(*FAST, "trainer.ckpt_every=0", f"paths.root={tmp_path}/stopped")
    cell = inputs.locate(cfg)[0]
    with monkeypatch.context() as m:
        _interrupt(where, m)
        capsys.readouterr()
        with pytest.raises(Interrupted):
            run_cell(cfg)
    err = capsys.readouterr().err
    resume = f"from its checkpoint at step {resumes_at}" if resumes_at else "from step 0 (no checkpoint was saved)"
    assert f"distill: not under SLURM: rerun the same command to resume {resume}" in err
    assert (cell / eng.CKPT_DIR).exists() == bool(resumes_at)
    resumed = run_cell(cfg)
    assert resumed["train"]["resumed_from_step"] == resumes_at  # what the console said
    assert resumed["eval"] == ref["eval"]
    for k, w in _weights(Path(ref["run_dir"])).items():
        torch.testing.assert_close(_weights(cell)[k], w, rtol=0, atol=0)
    assert not (cell / eng.CKPT_DIR).exists()


# ----------------------------------------------------------------------------------------------- 5. divergence
def test_a_nan_loss_stops_the_cell_at_that_step_failed_with_one_line(smoke_cfg, monkeypatch):
    cfg = smoke_cfg(*FAST, "trainer.log_every=1")
    cell = inputs.locate(cfg)[0]
    real_loss = step_mod.micro_batch_loss

    def nan_in_step_3(cell_, batch, num_tokens, **k):
        loss, parts = real_loss(cell_, batch, num_tokens, **k)
        return (loss * float("nan"), parts) if cell_.progress.step == 2 else (loss, parts)

    monkeypatch.setattr(step_mod, "micro_batch_loss", nan_in_step_3)
    with pytest.raises(TrainingDiverged) as err:
        run_cell(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("step 3/6: the training loss is nan: training diverged, the cell stops here; try a lower "
                   "trainer.lr (it is 0.001: e.g. 0.0001)")
    m = read_metrics(cell)
    assert m["status"] == "failed" and m["error"] == f"TrainingDiverged: {msg}" and m["attempts"][-1]["end_step"] == 3
    assert [r["step"] for r in _log_records(cell)] == [1, 2]  # no NaN line, no evaluation of the NaN weights
    assert not (cell / eng.CKPT_DIR).exists() and not (cell / "student").exists()  # step 3's checkpoint: not written


def test_a_non_finite_gradient_norm_stops_the_cell_too(smoke_cfg, monkeypatch):
    """ZeRO-1 reports the global gradient norm: an inf one stops the step although its loss is finite."""
    cfg = smoke_cfg(*FAST, "trainer.zero_stage=1")
    real_step = train_mod.train_step

    def step(cell_, i, *a, **k):
        out = real_step(cell_, i, *a, **k)
        assert cell_.engine.get_global_grad_norm() is not None  # what the check reads
        if i == 1:
            monkeypatch.setattr(cell_.engine, "get_global_grad_norm", lambda: float("inf"))
        return out

    monkeypatch.setattr(train_mod, "train_step", step)
    with pytest.raises(TrainingDiverged, match=r"^step 2/6: the gradient norm is inf \(loss [\d.e-]+\): training "
                                               r"diverged, the cell stops here; try a lower trainer.lr"):
        run_cell(cfg)
    assert read_metrics(inputs.locate(cfg)[0])["status"] == "failed"


def test_cli_a_diverging_learning_rate_is_one_line_exit_2_and_failed(tmp_path, data_root):
    proc = _cli("experiment=smoke", *FAST, "trainer.lr=1e6", f"paths.root={tmp_path}", f"paths.data_dir={data_root}",
                timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distill-train:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("distill-train: input error: step ")
    assert "training diverged, the cell stops here; try a lower trainer.lr (it is 1e+06: e.g. 1e+05)" in lines[0]
    assert "Traceback" not in proc.stderr
    (cell,) = (tmp_path / "adhoc").iterdir()
    m = json.loads((cell / METRICS_FILE).read_text())
    assert m["status"] == "failed" and m["error"].startswith("TrainingDiverged: step ")
    assert "Traceback" in (cell / "train.log").read_text()  # kept in the cell's log


# ----------------------------------------------------------------------------------------------- 6. garbage lock
@pytest.mark.parametrize("record", ["timestamp", "not json"])
def test_a_garbage_lock_file_is_refused_with_one_line_then_taken_over_once_stale(record, smoke_cfg, monkeypatch):
    cfg = smoke_cfg(*FAST, "cell_lock.wait_s=0")
    cell = inputs.locate(cfg)[0]
    cell.mkdir(parents=True)
    holder = json.loads(locks.Holder.me(30.0, 300.0).to_json())
    (cell / locks.LOCK_FILE).write_text(json.dumps({**holder, "updated_at": "yesterday"}) if record == "timestamp"
                                        else "locked by bob, back in 5 min")
    with pytest.raises(CellBusy) as busy:
        run_cell(cfg)
    assert "\n" not in str(busy.value)
    assert f"{cell} is being run by an unreadable lock record (written " in str(busy.value)
    assert not (cell / METRICS_FILE).exists()  # nothing written by the refused run
    old = time.time() - 1000  # nobody finished that record: stale by its mtime
    os.utime(cell / locks.LOCK_FILE, (old, old))
    assert run_cell(cfg)["status"] == "completed"
    assert not (cell / locks.LOCK_FILE).exists()


def test_cli_a_garbage_lock_file_is_one_line_and_exit_2(smoke_cfg, tmp_path, data_root):
    cell = inputs.locate(smoke_cfg(*FAST, "cell_lock.wait_s=0"))[0]
    cell.mkdir(parents=True)
    holder = json.loads(locks.Holder.me(30.0, 300.0).to_json())
    (cell / locks.LOCK_FILE).write_text(json.dumps({**holder, "updated_at": "yesterday"}))
    proc = _cli("experiment=smoke", *FAST, "cell_lock.wait_s=0", f"paths.root={tmp_path}",
                f"paths.data_dir={data_root}", timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distill-train:")]
    assert len(lines) == 1 and lines[0].startswith(f"distill-train: cell busy: {cell} is being run by an unreadable "
                                                   "lock record (written "), proc.stderr[-3000:]
