"""Hydra callbacks: the sweep report, and a prompt exit when SLURM stops a cell.

Enable in the root config:

    hydra:
      callbacks:
        report:
          _target_: distill.sweep.callbacks.ReportCallback
        preemption:
          _target_: distill.sweep.callbacks.PreemptionCallback

The report includes report.html, the offline dashboard. At the end of a multirun whose cells log to W&B,
the sweep's report is also logged to the sweep's W&B summary run (distill.report.wandb).

Hydra skips `on_multirun_end` when any job of the sweep failed, yet a report listing the failed
cells is exactly what one wants then. So the report is also rebuilt at the end of a job
(`on_job_end`, rank 0 only), and a file lock makes the last job to finish write the last, complete
report. With a submitit launcher that happens after every job: it runs inside each array task, and the
process that launched the array may be gone. With a launcher whose multirun process waits for its jobs
(hydra/launcher=pool, Hydra's basic one) it happens only once the sweep has a failed cell: until then
`on_multirun_end` writes the report once, instead of every job rebuilding it (seconds a cell).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from distill.cell import preemption as preempt
from distill.report import wandb as wandb_report
from distill.report.records import scan_sweep
from distill.report.summary import summarize
from distill.report.write import build_report

log = logging.getLogger(__name__)

LOCK_FILE = ".report.lock"


def _is_rank_zero() -> bool:
    """Multi-rank cells run the Hydra job once per rank; only rank 0 writes the report."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def refresh_report(sweep_dir: str | os.PathLike, timeout_s: float = 300.0) -> Path | None:
    """Rebuild the report of a sweep dir under a file lock; log (never raise) on failure.

    Returns the path of report.md, or None when nothing was written.
    """
    root = Path(sweep_dir)
    try:
        with FileLock(str(root / LOCK_FILE), timeout=timeout_s):
            paths = build_report(root)
    except (ValueError, Timeout) as e:
        log.warning("sweep report for %s not written: %s", root, e)
        return None
    except Exception as e:  # a report bug must not turn a finished training job into a failure
        log.error("sweep report for %s failed: %s: %s (rerun: distill-report %s)", root, type(e).__name__, e, root)
        return None
    return paths["report.md"]


def _sweep_has_failed(sweep_dir: str | os.PathLike, job_return: Any) -> bool:
    """This job failed, or a cell of the sweep dir did (Hydra will then skip on_multirun_end)."""
    if getattr(job_return, "status", None) == JobStatus.FAILED:
        return True
    return any(c.status == "failed" for c in scan_sweep(sweep_dir))


class ReportCallback(Callback):
    """Write report.md/.csv/.png/.html into hydra.sweep.dir after each job and at the end of a multirun."""

    def __init__(self, after_each_job: bool = True) -> None:
        self.after_each_job = after_each_job

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        hydra_cfg = HydraConfig.get()
        if not self.after_each_job or hydra_cfg.mode != RunMode.MULTIRUN or not _is_rank_zero():
            return
        if "submitit" not in str(hydra_cfg.launcher.get("_target_", "")) and \
                not _sweep_has_failed(config.hydra.sweep.dir, job_return):
            return  # the multirun's own process is waiting, and writes the report in on_multirun_end
        refresh_report(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        md = refresh_report(config.hydra.sweep.dir)
        if md is not None:
            log.info("Sweep report: %s (dashboard: report.html)", md)
            publish_summary_run(config)


def publish_summary_run(config: DictConfig) -> None:
    """Log the sweep's report to its W&B summary run (distill.report.wandb.log_summary_run) when the cells log
    to W&B; log (never raise) on failure.

    Only at the end of a multirun: one summary-run attempt per sweep run, not one per cell. When a cell
    failed, Hydra skips this; `distill-dashboard wandb SWEEP_DIR --project P` logs it then.
    """
    logger = config.get("logger") or {}
    mode = str(logger.get("mode") or "offline")
    if logger.get("name") != "wandb" or mode == "disabled":
        return
    root = Path(config.hydra.sweep.dir)
    try:
        wandb_report.log_summary_run(root, summarize(scan_sweep(root)), str(config.sweep_name),
                                     str(logger.get("project") or "distill"), logger.get("entity"), mode)
    except Exception as e:  # the sweep's results are on disk; its W&B summary must not fail the multirun
        log.error("W&B summary run of %s failed: %s: %s (rerun: distill-dashboard wandb %s --project %s)",
                  root, type(e).__name__, e, root, logger.get("project"))


class PreemptionCallback(Callback):
    """Under SLURM, catch SIGTERM and SIGUSR2 from the very start of each job (distill.cell.preemption).

    SLURM signals every task of a job it preempts, requeues, cancels or brings near its time limit, and
    SIGKILLs it `KillWait` seconds later; submitit ignores SIGTERM. From job start until the cell's
    training loop, a signal stops the job at once (nothing is worth saving yet) and requeues it if
    SLURM will not; inside the loop, `distill.train` stops at the next step boundary with a checkpoint.
    Either way the job leaves with SystemExit: submitit writes no result and the launcher waits for the
    requeued attempt, which resumes from the cell's checkpoint.
    """

    def __init__(self) -> None:
        self._installed = False

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "SLURM_JOB_ID" in os.environ and not self._installed:
            preempt.STATE.install()
            self._installed = True

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if self._installed:  # in-process multirun: the next job starts clean
            preempt.STATE.uninstall()
            self._installed = False
