import json
import os

import pytest
import wandb.errors

from distill.tracking import LOG_FILE, Tracker


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


def test_wandb_offline_run_files_and_resume_same_id(tmp_path):
    cfg = {"name": "wandb", "project": "distill-test", "mode": "offline", "dir": str(tmp_path)}
    config = {"tau": 2.0, "logger": {"api_key": "SECRET"}, "model": {"name": "toy"}}
    t = Tracker(cfg, run_id="fkl-tau2-abc", name="fkl-tau2", group="demo", tags=["div:fkl"], config=config,
                run_dir=tmp_path / "cell")
    t.log({"train/loss": 2.0}, step=1)
    t.summary({"eval": {"test": {"rougeL_mean": 12.5}}})
    t.finish()
    runs_dirs = list((tmp_path / "wandb").glob("offline-run-*-fkl-tau2-abc"))
    assert len(runs_dirs) == 1
    record = (runs_dirs[0] / "run-fkl-tau2-abc.wandb").read_bytes()  # protobuf records: strings stored raw
    assert b"model.name" in record and b"train/loss" in record
    assert b"SECRET" not in record
    # A requeued job re-inits with the same id: W&B resumes that run rather than creating a new id.
    t2 = Tracker(cfg, run_id="fkl-tau2-abc", name="fkl-tau2", group="demo", tags=[], config=config,
                 run_dir=tmp_path / "cell")
    assert t2.run.id == "fkl-tau2-abc"
    t2.finish()


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
