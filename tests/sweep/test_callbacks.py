"""distill.sweep.callbacks: when the report callback rebuilds the report after a job, and the preemption
callback's signal handling (the callbacks inside real multiruns: tests/behaviour/test_launchers.py)."""

import os
import signal

import pytest
from omegaconf import OmegaConf


@pytest.mark.parametrize("launcher, job_failed, cell_failed, refreshed", [
    ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", False, False, True),  # every job
    ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", False, False, False),    # at the end
    ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", True, False, True),
    ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", False, True, True),
])
def test_report_callback_rebuilds_after_a_job_where_no_multirun_end_may_come(
        tmp_path, monkeypatch, launcher, job_failed, cell_failed, refreshed):
    import json

    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    from distill.sweep import callbacks as callbacks

    hydra_cfg = OmegaConf.create({"mode": RunMode.MULTIRUN, "launcher": {"_target_": launcher}})
    monkeypatch.setattr(callbacks.HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    calls = []
    monkeypatch.setattr(callbacks, "refresh_report", calls.append)
    for div, status in (("fkl", "completed"), ("rkl", "failed" if cell_failed else "completed")):
        m = {"schema_version": 1, "status": status, "name": f"{div}-s0", "cell": {"divergence": div, "tau": 1.0, "seed": 0},
             **({"eval": {"test": {"rougeL_mean": 1.0}}} if status == "completed" else {"error": "RuntimeError: boom"})}
        (tmp_path / f"{div}-s0-0123abcd").mkdir()
        (tmp_path / f"{div}-s0-0123abcd" / "metrics.json").write_text(json.dumps(m))
    job = JobReturn(status=JobStatus.FAILED if job_failed else JobStatus.COMPLETED)
    callbacks.ReportCallback().on_job_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}), job)
    assert calls == ([str(tmp_path)] if refreshed else [])


def test_preemption_callback_exits_on_sigterm_only_under_slurm(monkeypatch):
    from distill.sweep.callbacks import PreemptionCallback

    before = signal.getsignal(signal.SIGTERM)
    cb = PreemptionCallback()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cb.on_job_start(config=None)
    assert signal.getsignal(signal.SIGTERM) is before  # outside SLURM: untouched
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    cb.on_job_start(config=None)
    try:
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs at the next bytecode boundary
                pass
        assert e.value.code == 128 + signal.SIGTERM
    finally:
        cb.on_job_end(config=None)
    assert signal.getsignal(signal.SIGTERM) is before
