import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import wandb.errors

from distill.tracking import offline as wandb_offline
from distill.tracking.wandb_run import LOG_FILE, Tracker, job_type, run_id

REPO = Path(__file__).resolve().parents[2]


def test_local_log_written_and_disabled_rank_writes_nothing(tmp_path):
    t = Tracker({"name": "none"}, run_id="r", name="n", group="g", tags=[], config={}, run_dir=tmp_path)
    t.log({"train/loss": 1.5}, step=3)
    t.finish()
    assert json.loads((tmp_path / LOG_FILE).read_text()) == {"step": 3, "train/loss": 1.5}

    other = tmp_path / "rank1"
    t1 = Tracker({"name": "wandb"}, run_id="r", name="n", group="g", tags=[], config={}, run_dir=other, enabled=False)
    t1.log({"x": 1}, step=1)
    t1.finish()
    assert not other.exists()


def _wandb_cfg(root):
    return {"name": "wandb", "project": "distill-test", "mode": "offline", "dir": str(root)}


def test_run_id_is_scoped_to_the_sweep_and_safe_for_wandb():
    assert run_id("demo", "fkl-tau2-s0", "1a2b3c4d") == "demo-fkl-tau2-s0-1a2b3c4d"
    assert run_id("demo", "fkl-tau2-s0", "1a2b3c4d") != run_id("demo2", "fkl-tau2-s0", "1a2b3c4d")
    assert run_id("a/b c:d", "x", "y") == "a_b_c_d-x-y"


def test_job_type_from_kd_ratio_unless_configured():
    assert job_type(1.0) == "distill" and job_type(0.5) == "distill" and job_type(0.0) == "student-sft"
    assert job_type(0.0, "teacher-sft") == "teacher-sft"
    with pytest.raises(ValueError, match="logger.job_type"):
        job_type(0.0, "teacher")


def test_wandb_run_naming_summary_console_and_generations(tmp_path):
    import wandb

    rid = run_id("demo", "fkl-tau2-s0", "abcd1234")
    config = {"tau": 2, "seed": 0, "logger": {"api_key": "SECRET"}, "divergence": {"name": "fkl"},
              "loss": {"kd_ratio": 1}, "model": {"name": "toy"}, "data": {"name": "embedded"}}
    t = Tracker(_wandb_cfg(tmp_path), run_id=rid, name="fkl-tau2-s0", group="demo", job_type="distill",
                tags=["div:fkl"], config=config, run_dir=tmp_path / "cell")
    print("hello from the cell")
    t.log({"train/loss": 2.0}, step=1)
    t.log({"valid/ce": 3.0}, step=1)
    t.log({"train/loss": 1.5}, step=2)
    gens = [{"seed": 10, "prompt": "Add 1 and 2.", "output": "3", "references": ["3", "It is 3."], "rougeL": 100.0}]
    t.log_final({"valid/ce": 2.5, "eval/test/rougeL": 41.0, "eval/test/rougeL_std": 1.0}, step=2, tau=2,
                generations={"test": gens})
    t.summary({"train/time_s": 1.5})
    t.finish()
    wandb.teardown()  # the in-process service writes the last records on teardown

    (path,) = wandb_offline.run_files(tmp_path, rid)
    assert path.parent.parent == tmp_path / "wandb"   # logger.dir/wandb: the sweep's one W&B folder
    info, cfg = wandb_offline.run_info(path)
    assert info["run_id"] == rid and info["group"] == "demo" and info["job_type"] == "distill"
    assert cfg["tau"] == 2.0 and isinstance(cfg["tau"], float)          # typed as 2, stored as a float
    assert cfg["divergence"] == {"name": "fkl"} and "api_key" not in cfg["logger"]
    assert b"SECRET" not in path.read_bytes()
    records = list(wandb_offline.read_records(path))
    console = "".join(r.output_raw.line for r in records if r.WhichOneof("record_type") == "output_raw")
    assert "hello from the cell" in console                              # console="wrap", offline
    rows = wandb_offline.history_rows(path)
    assert [r["_step"] for r in rows] == [1, 2]
    assert rows[-1]["tau"] == 2.0 and rows[-1]["eval/test/rougeL"] == 41.0   # x and y of "ROUGE-L vs tau"
    assert rows[-1]["eval/test/generations"]["_type"] == "table-file"
    table_file = path.parent / "files" / rows[-1]["eval/test/generations"]["path"]
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["seed", "prompt", "output", "references", "score"]
    assert table["data"] == [[10, "Add 1 and 2.", "3", "3\nIt is 3.", 100.0]]
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "eval/*" and m.step_metric == "tau" for m in metrics)
    summary = wandb_offline.final_summary(path)
    # one naming scheme, final values: valid/ce is the last one logged (2.5), not the first
    assert summary["eval/test/rougeL"] == 41.0 and summary["valid/ce"] == 2.5 and summary["train/time_s"] == 1.5
    assert not [k for k in summary if "." in k], summary.keys()
    # and the report's W&B reader reads this run back
    from distill.report.wandb import record_from_wandb

    cell = record_from_wandb(rid, "finished", cfg, summary)
    assert cell.status == "completed" and cell.metrics["eval"]["test"]["rougeL_mean"] == 41.0
    assert cell.metrics["eval"]["test"]["rougeL_std"] == 1.0 and cell.metrics["valid"] == {"ce": 2.5}
    assert cell.label_source["tau"] == 2.0 and cell.label_source["divergence"] == "fkl"


ATTEMPT = """
import os, signal, sys
from pathlib import Path
from distill.tracking.wandb_run import Tracker
root, first, last, kill = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "kill"
cfg = {"name": "wandb", "project": "distill-test", "mode": "offline", "dir": str(root)}
t = Tracker(cfg, run_id="sw-fkl-tau2-s0-abc", name="fkl-tau2-s0", group="sw", tags=[], job_type="distill",
            config={"tau": 2.0}, run_dir=root / "cell")
for step in range(first, last + 1):
    t.log({"train/loss": 1.0 / step, "train/lr": 1e-3, "train/tokens": 100.0 * step}, step=step)
    if step % 50 == 0:
        t.log({"valid/ce": 2.0 + 1.0 / step}, step=step)
if kill:
    os.killpg(0, signal.SIGKILL)   # the cell and its W&B service at once, as SLURM kills a job
t.finish()
"""


def _attempt(root, first, last, kill):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_SERVICE", None)
    return subprocess.run([sys.executable, "-c", ATTEMPT, str(root), str(first), str(last), "kill" if kill else ""],
                          env=env, capture_output=True, text=True, timeout=300, start_new_session=True)


def test_a_killed_and_resumed_cell_has_every_step_once_in_wandb(tmp_path):
    # attempt 1 logs steps 1..700 and is SIGKILLed with its W&B service: W&B's writer keeps the last
    # (< 32 KiB) block in memory, so the tail never reaches its file, and the file ends in a torn record
    first = _attempt(tmp_path, 1, 700, kill=True)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    (dead,) = wandb_offline.run_files(tmp_path, "sw-fkl-tau2-s0-abc")
    on_disk = wandb_offline.logged_steps([dead])["train/loss"]
    assert 0 < on_disk < 700                    # the kill lost a tail (train_log.jsonl has all 700)
    # attempt 2 resumes from the checkpoint at step 600 and trains on to 800
    second = _attempt(tmp_path, 601, 800, kill=False)
    assert second.returncode == 0, second.stderr[-2000:]
    files = wandb_offline.run_files(tmp_path, "sw-fkl-tau2-s0-abc")
    assert len(files) == 2 and files[0] == dead
    # once synced (the attempts, in start order, append to one run): every step exactly once
    for key, expected in (("train/loss", list(range(1, 801))), ("valid/ce", list(range(50, 801, 50)))):
        steps = sorted(r["_step"] for f in files for r in wandb_offline.history_rows(f) if key in r)
        assert steps == expected, key
    # the values of the replayed tail are attempt 1's own (from the local log)
    replayed = [r for r in wandb_offline.history_rows(files[1]) if r["_step"] == on_disk + 1]
    assert replayed[0]["train/loss"] == pytest.approx(1.0 / (on_disk + 1))
    # and the dead attempt's file now ends cleanly, so `wandb sync` reads it to the end
    assert wandb_offline.repair(dead) == 0


def test_repair_cuts_a_torn_record_and_nothing_else(tmp_path):
    import wandb

    t = Tracker(_wandb_cfg(tmp_path), run_id="torn", name="torn", group="g", tags=[], config={}, run_dir=tmp_path / "c")
    for step in range(1, 40):
        t.log({"train/loss": float(step)}, step=step)
    t.finish()
    wandb.teardown()
    (path,) = wandb_offline.run_files(tmp_path, "torn")
    whole = len(list(wandb_offline.read_records(path)))
    assert wandb_offline.repair(path) == 0      # a finished run's file is left alone
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 5)                     # the last record loses its end
    assert len(list(wandb_offline.read_records(path))) == whole - 1
    cut = wandb_offline.repair(path)
    assert 0 < cut < size and wandb_offline.repair(path) == 0
    assert len(list(wandb_offline.read_records(path))) == whole - 1


def test_a_dead_wandb_service_never_fails_the_cell(tmp_path, caplog):
    class Dead:
        def log(self, *a, **k):
            raise ConnectionResetError("Connection lost")

        summary = property(lambda self: (_ for _ in ()).throw(ConnectionResetError("Connection lost")))

    t = Tracker({"name": "none"}, run_id="r", name="n", group="g", tags=[], config={}, run_dir=tmp_path)
    t.run = Dead()
    t.log({"train/loss": 1.0}, step=1)
    assert t.run is None and "wandb stopped logging" in caplog.text
    t.log({"train/loss": 0.5}, step=2)  # the local log goes on
    assert (tmp_path / LOG_FILE).read_text().count("train/loss") == 2


def test_a_cell_never_attaches_to_another_process_wandb_service(tmp_path, monkeypatch):
    # A SLURM job inherits its submitter's environment; a killed attempt's stream could stay open there.
    monkeypatch.setenv("WANDB_SERVICE", "3-999999-unix-/tmp/no-such-socket")
    cfg = {"name": "wandb", "project": "distill-test", "mode": "offline", "dir": str(tmp_path)}
    t = Tracker(cfg, run_id="svc-abc", name="svc", group="g", tags=[], config={}, run_dir=tmp_path / "cell")
    t.log({"train/loss": 1.0}, step=1)
    t.finish()
    assert not os.environ.get("WANDB_SERVICE", "").startswith("3-999999-")
    assert list((tmp_path / "wandb").glob("offline-run-*-svc-abc/run-svc-abc.wandb"))


def test_steps_logged_before_wandb_was_on_reach_wandb_once(tmp_path):
    # e.g. a cell started with logger=none, resumed with logger=wandb: W&B gets the whole history, once
    import wandb

    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / LOG_FILE).write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 2, 3))
                                 + '{"step": 4, "train/lo')   # steps 2-3 redone after a resume; a torn last line
    t = Tracker(_wandb_cfg(tmp_path), run_id="late", name="late", group="g", tags=[], config={}, run_dir=cell)
    for step in (3, 4, 5):   # this attempt resumed at step 2
        t.log({"train/loss": 1.0 / step}, step=step)
    t.finish()
    wandb.teardown()
    (path,) = wandb_offline.run_files(tmp_path, "late")
    assert [r["_step"] for r in wandb_offline.history_rows(path) if "train/loss" in r] == [1, 2, 3, 4, 5]


def test_a_bug_in_a_tracking_call_is_not_taken_for_a_dead_service(tmp_path):
    class Refusing:
        def log(self, *a, **k):
            raise wandb.errors.CommError("run is finished")

    class Buggy:
        def log(self, *a, **k):
            raise TypeError("log() got an unexpected keyword argument")

    t = Tracker({"name": "none"}, run_id="r", name="n", group="g", tags=[], config={}, run_dir=tmp_path)
    t.run = Refusing()
    t.log({"train/loss": 1.0}, step=1)  # W&B's own error: W&B is dropped, the cell goes on
    assert t.run is None
    t.run = Buggy()
    with pytest.raises(TypeError, match="unexpected keyword"):
        t.log({"train/loss": 1.0}, step=2)


def test_an_attempt_waits_for_the_second_after_the_last_attempts_wandb_folder(tmp_path):
    """W&B names a run's folder by its start second: a resume within the same second would reuse the folder of the
    attempt before it (its records replaced). The tracker waits for the clock to leave that second."""
    import time

    from distill.tracking.wandb_run import _after_the_last_attempts_second

    folder = tmp_path / "wandb" / f"offline-run-{time.strftime('%Y%m%d_%H%M%S')}-rid" / "run-rid.wandb"
    _after_the_last_attempts_second([folder])
    assert time.strftime("%Y%m%d_%H%M%S") not in folder.parent.name
    t0 = time.monotonic()
    _after_the_last_attempts_second([tmp_path / "wandb" / "offline-run-20000101_000000-rid" / "run-rid.wandb"])
    _after_the_last_attempts_second([])
    assert time.monotonic() - t0 < 0.5   # nothing to wait for
