"""Preemption and time limits: SIGTERM/SIGUSR2 stop a cell at the next step boundary, checkpointed, requeued.

SLURM signals every task of a job: SIGTERM when it preempts, requeues or cancels it (then SIGKILL after
`KillWait`), SIGUSR2 `signal_delay_s` before the time limit (the launcher's `--signal`). The handler only
records the signal while the cell trains (`in_loop`: the steps, then the final validation, selection and
export); at the next boundary the ranks agree (an all-reduce of the flag: one rank's signal stops all), save a
checkpoint (trainer.ckpt_every=0 included) and leave with `Interrupted` (a SystemExit, so submitit writes no
result and the launcher waits for the requeued attempt). Elsewhere (setup, the benchmark evaluation once the
engine is freed) there is nothing to save and the handler raises at once; the requeue message says where the
next attempt starts (its latest checkpoint, or step 0).

Who requeues: SLURM itself when it preempts or when someone ran `scontrol requeue` (the job is then no
longer RUNNING). Otherwise nobody would, so the job requeues itself: through submitit's own handler when
submitit runs the job (it keeps submitit's time-out countdown), else `scontrol requeue`. A job that was
cancelled (`scancel`) is not requeued: its cell reads `interrupted`, and a rerun resumes it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from distill.cell.lock import slurm_job_state

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Interrupted(SystemExit):
    """The cell stopped on a signal (exit status 128 + signum); a requeued attempt or a rerun resumes it."""

    def __init__(self, signum: int, reason: str = "") -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.reason = reason or f"stopped by {signal.Signals(signum).name}"


def slurm_job_id() -> str | None:
    """This job's id as scontrol names it (`<array job>_<task>` for array tasks), if under SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption:
    """The process's signal state: which signal came, and whether a cell's training loop is running."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_cell = False   # run_cell is active: it records and requeues on the way out
        self.in_loop = False   # between step boundaries: only record, the boundary stops
        self._previous: dict[int, Any] = {}
        self._installs = 0

    # ---------------------------------------------------------------- handlers
    def install(self) -> None:
        """Catch SIGTERM and SIGUSR2 (main thread only; nested installs are counted)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if self._installs == 0:
            self.signum = None
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        self._installs += 1

    def uninstall(self) -> None:
        """Give the signals back to whoever had them, once the outermost install is undone."""
        if self._installs == 0:
            return
        self._installs -= 1
        if self._installs == 0:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        where = "at the next step boundary (checkpoint, then exit)" if self.in_loop else "now"
        print(f"distill: {signal.Signals(signum).name} (pid {os.getpid()}, SLURM job {slurm_job_id() or '-'}): "
              f"stopping {where}", file=sys.stderr, flush=True)
        if not first or self.in_loop:
            return  # a second signal while stopping must not cut the cleanup short
        if not self.in_cell:
            self.requeue()  # no cell to save: requeue (if needed) and go
        raise Interrupted(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def submitit_handler(self) -> Any:
        """submitit's USR2 handler (checkpoint_and_try_requeue), when submitit runs this job."""
        previous = self._previous.get(signal.SIGUSR2)
        return previous if getattr(previous, "__name__", "") == "checkpoint_and_try_requeue" else None

    # ---------------------------------------------------------------- requeue
    def requeue(self, resume: str = "from its latest checkpoint") -> str:
        """Requeue this SLURM job if nobody else will; return what happened (one line, also logged). `resume`
        says where the next attempt starts (`from its checkpoint at step 4`, `from step 0 (...)`).

        Call on rank 0 only, after the checkpoint and metrics are written and the cell lock is released.
        """
        job = slurm_job_id()
        if job is None:
            msg = f"not under SLURM: rerun the same command to resume {resume}"
        else:
            state = slurm_job_state(job)
            if state is None:
                msg = f"SLURM job {job}: its state is unknown here (no scontrol): not requeued"
            elif state != "RUNNING":
                msg = f"SLURM job {job} is {state}: SLURM requeues it or not (a requeued job resumes {resume})"
            else:
                msg = self._requeue_running(job, resume)
        log.warning("%s", msg)
        print(f"distill: {msg}", file=sys.stderr, flush=True)
        return msg

    def _requeue_running(self, job: str, resume: str) -> str:
        handler = self.submitit_handler()
        if handler is not None:
            # submitit's path: its time-out countdown, its pickled submission, `scontrol requeue`, then
            # sys.exit, which we take back so the caller finishes its own way out.
            try:
                handler(signal.SIGUSR2, None)
            except SystemExit:
                pass
            return f"SLURM job {job} requeued through submitit: the next attempt resumes {resume}"
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            return f"SLURM job {job}: scontrol requeue failed ({(proc.stderr or proc.stdout).strip()}): not requeued"
        return f"SLURM job {job} requeued: the next attempt resumes {resume}"


STATE = Preemption()


@contextmanager
def guard() -> Iterator[Preemption]:
    """Signals caught for the duration of one cell (run_cell)."""
    STATE.install()
    STATE.in_cell = True
    try:
        yield STATE
    finally:
        STATE.in_cell = STATE.in_loop = False
        STATE.uninstall()
