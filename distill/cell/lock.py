"""One cell runs once: a lock file in the cell dir with a heartbeat, safe on a shared filesystem.

The lock is `<cell>/cell.lock`, a small JSON record of its holder (host, pid, SLURM job/array ids, restart
count, started_at, updated_at). It is created the NFS-safe way (write a private file, then `os.link` it to
the lock name: link is atomic on NFS, where O_EXCL was not always), refreshed by a heartbeat thread, and
removed on release. A holder is dead, and its lock is taken over, when

- its heartbeat is older than `stale_after_s` (a host that died, a job that was SIGKILLed elsewhere), or
- it ran on this host and its pid is gone, or
- it is an earlier attempt of our own SLURM job (same job id, other restart count), or
- SLURM says its job is no longer running.

Take-over happens under a short take-over mutex and removes the lock only if it still holds the dead
holder's record (a live lock is never removed); the remover then competes for the lock like anyone else. The heartbeat
also checks that the record is still its own: a holder that lost its lock (a pause longer than
`stale_after_s`, then someone took over) sees `lost` and stops at its next step instead of writing on. A refresh that
fails (a full disk, a quota, NFS EIO/ESTALE) is retried at the next beat; a holder that could not refresh its record
for `stale_after_s` (from then on anyone may take it over) counts as having lost it. Before each write of the cell
(a train-log line, a checkpoint, the export, metrics.json, a clean-up) the holder asks `holds()`, which also reads
the lock file afresh, so a holder that was paused (SIGSTOP) and taken over writes nothing once it runs again.
A record that cannot be read (not JSON, a field of the wrong type, a timestamp like "yesterday") is dated by the
file's mtime: it turns stale `stale_after_s` after its last write, like a holder that stopped beating.
Filesystem clocks are not used: times in the record are the writers' own (UTC seconds), so hosts
need roughly synchronised clocks (NTP), which clusters have; `stale_after_s` should be minutes, not seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from distill.options import CellBusy, LockLost
from distill.files import atomic_write_text

log = logging.getLogger(__name__)

LOCK_FILE = "cell.lock"
UNREADABLE = "?"  # the token of a record that cannot be read: nobody's, dated by the file's mtime


def slurm_ids() -> dict[str, str]:
    """The SLURM ids of this process (job, array job, array task, restart count, step/proc), those that are set."""
    names = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
             "restart_count": "SLURM_RESTART_COUNT", "procid": "SLURM_PROCID"}
    return {k: os.environ[v] for k, v in names.items() if os.environ.get(v)}


@dataclass
class Holder:
    """Who holds a cell lock, as recorded in the lock file."""

    token: str
    host: str
    pid: int
    started_at: float
    updated_at: float
    heartbeat_s: float
    stale_after_s: float
    slurm: dict[str, str]

    @classmethod
    def me(cls, heartbeat_s: float, stale_after_s: float) -> Holder:
        now = time.time()
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, heartbeat_s, stale_after_s, slurm_ids())

    def describe(self, now: float | None = None) -> str:
        """`host h pid 12 (SLURM job 34), heartbeat 5 s ago`; for an unreadable record, its age and when it
        turns stale."""
        age = (now or time.time()) - self.updated_at
        if self.token == UNREADABLE:
            return (f"an unreadable lock record (written {age:.0f} s ago; stale, and taken over, once it is "
                    f"{self.stale_after_s:.0f} s old)")
        job = f" (SLURM job {self.slurm['job_id']})" if self.slurm.get("job_id") else ""
        return f"host {self.host} pid {self.pid}{job}, heartbeat {age:.0f} s ago"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_holder(text: str) -> Holder | None:
    """The record a lock file holds, or None when it is not one: not JSON, a missing or unknown field, a field
    of the wrong type (a timestamp "yesterday", NaN, a pid "12")."""
    try:
        data = json.loads(text)
        holder = Holder(**{**data, "slurm": dict(data.get("slurm") or {})})
    except (ValueError, TypeError, AttributeError):
        return None
    fine = (isinstance(holder.token, str) and holder.token != UNREADABLE and isinstance(holder.host, str)
            and isinstance(holder.pid, int) and not isinstance(holder.pid, bool)
            and all(_number(v) for v in (holder.started_at, holder.updated_at, holder.heartbeat_s))
            and _number(holder.stale_after_s) and holder.stale_after_s > 0
            and all(isinstance(k, str) and isinstance(v, str) for k, v in holder.slurm.items()))
    return holder if fine else None


def read_holder(path: Path, stale_after_s: float = 300.0) -> Holder | None:
    """The record in a lock file; None when there is none. A record that cannot be read (being written, cut,
    garbage, a field of the wrong type) is dated by the file's mtime and goes stale after the reader's
    `stale_after_s`, so it turns stale only if nobody finishes it."""
    try:
        text = Path(path).read_text(errors="replace")
        mtime = Path(path).stat().st_mtime
    except FileNotFoundError:
        return None
    holder = _parse_holder(text)
    return holder if holder is not None else Holder(UNREADABLE, "?", -1, mtime, mtime, 0.0, stale_after_s, {})


def _link_create(path: Path, text: str, token: str) -> bool:
    """Create `path` holding `text` atomically, only if it does not exist (NFS-safe: a private file, then link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{token}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # NFS: the link may have been made although the reply was lost; the link count tells.
        return tmp.stat().st_nlink == 2
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def slurm_job_state(job_id: str) -> str | None:
    """`RUNNING`, `PENDING`, ... as scontrol reports it; None when that cannot be known here."""
    if not shutil.which("scontrol"):
        return None
    try:
        proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        # "Invalid job id specified": the job is gone from the controller (long finished).
        return "GONE" if "invalid job id" in (proc.stderr + proc.stdout).lower() else None
    for field in proc.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def stale_reason(holder: Holder, now: float | None = None, *, ask_slurm: bool = True) -> str | None:
    """Why `holder` is dead (its lock may be taken over), or None when it may be alive."""
    now = time.time() if now is None else now
    age = now - holder.updated_at
    if age > holder.stale_after_s:
        return f"its heartbeat is {age:.0f} s old (stale after {holder.stale_after_s:.0f} s)"
    if holder.host == socket.gethostname() and holder.pid > 0 and holder.pid != os.getpid() \
            and not _pid_alive(holder.pid):
        return f"process {holder.pid} on this host is gone"
    job = holder.slurm.get("job_id")
    mine = slurm_ids()
    if job and job == mine.get("job_id") and holder.slurm.get("restart_count", "0") != mine.get("restart_count", "0"):
        return f"it is an earlier attempt of this SLURM job ({job}, restart {holder.slurm.get('restart_count', '0')})"
    if job and ask_slurm and job != mine.get("job_id"):
        state = slurm_job_state(job)
        if state is not None and state not in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"):
            return f"its SLURM job {job} is {state}"
    return None


class CellLock:
    """The lock of one cell dir. `acquire` / `release`, or use as a context manager."""

    def __init__(self, cell_dir: str | os.PathLike, heartbeat_s: float = 30.0, stale_after_s: float = 300.0) -> None:
        if not 0 < heartbeat_s < stale_after_s:
            raise ValueError(f"need 0 < heartbeat_s < stale_after_s, got {heartbeat_s} and {stale_after_s}")
        self.path = Path(cell_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = float(heartbeat_s), float(stale_after_s)
        self.me: Holder | None = None
        self.lost = False
        self.lost_why: str | None = None   # how it was lost: who holds it now, or the refreshes that failed
        self.took_over: str | None = None  # why the previous holder was dead, when we took its lock
        self._failing: str | None = None   # the refresh error while the heartbeat retries it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ acquiring
    def try_acquire(self) -> Holder | None:
        """Take the lock if it is free or its holder is dead; return None when taken, else the live holder."""
        for _ in range(5):
            me = Holder.me(self.heartbeat_s, self.stale_after_s)
            if self._create(me):
                self.me, self.lost, self.lost_why = me, False, None
                self._start_heartbeat()
                return None
            holder = read_holder(self.path, self.stale_after_s)
            if holder is None:
                continue  # released between our attempt and our look: try again
            reason = stale_reason(holder)
            if reason is None:
                return holder
            if self._remove_dead(holder):
                log.warning("cell lock %s: taking over from %s: %s", self.path, holder.describe(), reason)
                self.took_over = f"{holder.describe()}: {reason}"
        return read_holder(self.path, self.stale_after_s)

    def acquire(self, wait_s: float | None = None, poll_s: float | None = None) -> None:
        """Take the lock, waiting `wait_s` seconds for a live holder (None: as long as it lives); else CellBusy."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        poll = poll_s if poll_s is not None else min(10.0, self.heartbeat_s)
        announced = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise CellBusy(f"{self.path.parent} is being run by {holder.describe()}")
            if not announced:
                log.warning("cell %s is being run by %s: waiting for it", self.path.parent, holder.describe())
                announced = True
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def _create(self, me: Holder) -> bool:
        """Atomically create the lock file holding `me`'s record; False if it exists."""
        return _link_create(self.path, me.to_json(), me.token)

    def _remove_dead(self, dead: Holder) -> bool:
        """Remove the dead holder's lock; True if we removed it (False: another process got there first).

        Removers take a short take-over mutex (itself a link-created file), then remove the lock only if it
        still holds the dead record: a live lock is never removed, and several processes that all found the
        same dead holder remove it once, then compete for the lock through `_create` like anyone else.
        """
        mutex = self.path.with_name(LOCK_FILE + ".takeover")
        me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        if not _link_create(mutex, json.dumps({"at": time.time(), "by": me}), uuid.uuid4().hex):
            try:  # a remover that died inside this millisecond window must not block the cell for ever
                at = float(json.loads(mutex.read_text())["at"])
            except FileNotFoundError:
                return False
            except (ValueError, KeyError, TypeError):
                at = mutex.stat().st_mtime
            if time.time() - at > self.stale_after_s:
                mutex.unlink(missing_ok=True)
            return False
        try:
            current = read_holder(self.path, self.stale_after_s)
            # Same token and same time: not refreshed since it was judged dead (an unreadable record has no
            # token of its own: its mtime tells one garbage file from the next).
            if current is None or (current.token, current.updated_at) != (dead.token, dead.updated_at):
                return False
            self.path.unlink(missing_ok=True)
            return True
        finally:
            mutex.unlink(missing_ok=True)

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="cell-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """The heartbeat thread: refresh every `heartbeat_s`. A refresh that fails (ENOSPC, a quota, NFS
        EIO/ESTALE) is retried at the next beat, never the end of the thread: a holder whose thread died would
        train on while its record went stale and a second run took the cell over."""
        while not self._stop.wait(self._next_beat_s()):
            try:
                if not self.beat():
                    return
            except OSError as exc:
                if self._failing is None:
                    log.warning("cell lock %s: cannot refresh the record (%s): retrying every %.0f s; the run stops "
                                "if it cannot for %.0f s", self.path, exc, self.heartbeat_s, self.stale_after_s)
                self._failing = str(exc)
            else:
                if self._failing is not None:
                    log.warning("cell lock %s: refreshed again", self.path)
                self._failing = None

    def _next_beat_s(self) -> float:
        """Seconds to the next beat: `heartbeat_s`, or just past the moment a failing record turns stale, so that
        `lost` is set then and not a beat later."""
        me = self.me
        if me is None:
            return 0.0
        return max(0.0, min(self.heartbeat_s, me.updated_at + self.stale_after_s - time.time() + 0.01))

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost, self.lost_why = True, why
            log.error("cell lock %s lost: %s", self.path, why)

    def _overdue(self, me: Holder) -> bool:
        """Whether our record is older than `stale_after_s` (from then on anyone may take it over): then it is lost."""
        age = time.time() - me.updated_at
        if age > self.stale_after_s:
            self._lose(f"its record could not be refreshed for {age:.0f} s (stale after {self.stale_after_s:g} s)")
        return self.lost

    def beat(self) -> bool:
        """Refresh the record (atomic replace); False, with `lost` set, if it is no longer ours or was not
        refreshed for `stale_after_s`. A write that fails raises OSError (the heartbeat retries it) and leaves
        the record's time as it was."""
        me = self.me
        if me is None or self.lost or self._overdue(me):
            return False
        holder = read_holder(self.path, self.stale_after_s)
        if holder is None or holder.token != me.token:
            self._lose(f"{holder.describe() if holder else 'nobody'} holds it now")
            return False
        fresh = replace(me, updated_at=time.time())
        atomic_write_text(self.path, fresh.to_json())
        self.me = fresh
        return True

    def holds(self) -> bool:
        """Whether this process still holds the lock: asked before each write of the cell. Not lost, refreshed
        within `stale_after_s`, and the lock file, read afresh, still holds our record (a holder that was
        paused and taken over learns it here before its heartbeat does). A read that fails (NFS EIO) leaves
        the verdict to the refresh deadline."""
        me = self.me
        if me is None or self.lost or self._overdue(me):
            return False
        try:
            holder = read_holder(self.path, self.stale_after_s)
        except OSError:
            return True
        if holder is None or holder.token != me.token:
            self._lose(f"{holder.describe() if holder else 'nobody'} holds it now")
            return False
        return True

    def ensure_held(self, doing: str) -> None:
        """Raise LockLost (nothing written) unless this process still holds the lock (`holds`), before `doing`."""
        if not self.holds():
            raise lost_error(self.path.parent, doing, self.lost_why)

    # ------------------------------------------------------------------ releasing
    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.heartbeat_s))
            self._thread = None
        if self.me is not None:
            holder = read_holder(self.path, self.stale_after_s)
            if holder is not None and holder.token == self.me.token:
                self.path.unlink(missing_ok=True)
        self.me = None

    def __enter__(self) -> CellLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lost_error(cell_dir: str | os.PathLike, doing: str, why: str | None = None) -> LockLost:
    """The one-line LockLost of a run that no longer holds its cell's lock, found before `doing`."""
    return LockLost(f"{cell_dir}: this run no longer holds the cell's lock ({why or 'it was taken over'}): stopped "
                    f"before {doing}, without writing; the run that holds it now finishes the cell (or a rerun "
                    "resumes it)")


def liveness(cell_dir: str | os.PathLike) -> str | None:
    """For a cell whose metrics.json says `running`: None if a live holder runs it, else why it is stale."""
    holder = read_holder(Path(cell_dir) / LOCK_FILE)
    if holder is None:
        return "no process holds its lock (killed without a chance to record it)"
    reason = stale_reason(holder, ask_slurm=False)
    return None if reason is None else f"holder {holder.describe()}: {reason}"
