"""The lock of one cache build: a file lock, a record of who holds it, and a wait that is never silent.

Cells that start together need the same teacher cache; the first builds it under `<name>.lock` and the others
wait. The holder writes `<name>.holder` beside the lock (host, pid, SLURM job, since when, and a progress count
it refreshes while it works: `BuildLock.beat`). A waiting cell says at once what it waits for and who holds it,
says it again every few minutes, and gives up with one line (`InputError`) once the holder has shown no
progress for `wait_s` seconds: a builder that was stopped (SIGSTOP) or hangs no longer blocks every later cell for
ever, while one that is merely slow keeps the others waiting. Progress is judged by the waiter's own clock
(the record changed or not), so hosts need not agree on the time.

A lock file that cannot be created (a read-only cache dir) raises the `OSError` unchanged: the caller knows
whether it needs the lock at all (a complete cache is read without it).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from distill.cell.lock import slurm_ids
from distill.files import atomic_write_json
from distill.options import InputError

log = logging.getLogger(__name__)

NOTE_EVERY_S = 300.0  # a waiting cell repeats what it waits for this often
POLL_S = 5.0          # how often a waiting cell tries the lock again and looks at the holder's record
BEAT_S = 30.0         # a builder refreshes its record at most this often (each refresh is a small atomic write)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_holder(record: dict | None, record_path: Path) -> str:
    """`held by host h pid 12 (SLURM job 34) since <UTC time>, last progress at <UTC time>`."""
    if not record:
        return f"held by a process that left no record ({record_path.name} is missing or unreadable)"
    job = f" (SLURM job {record['slurm_job']})" if record.get("slurm_job") else ""
    return (f"held by host {record.get('host', '?')} pid {record.get('pid', '?')}{job} since "
            f"{record.get('since', '?')}, last progress at {record.get('updated', '?')}")


class BuildLock:
    """`acquire` (waits as described above) / `beat` while building / `release`; a no-op `beat` and `release`
    when this process does not hold it (the other ranks of a cell)."""

    def __init__(self, path: Path, *, wait_s: float | None, what: str, setting: str | None = None) -> None:
        self.path = Path(path)
        self.record_path = self.path.with_suffix(".holder")
        self.wait_s = wait_s
        self.what = what          # what the lock guards, for the messages: "teacher cache teacher-<key>"
        self.setting = setting    # the config key of wait_s, for the messages (None: no setting, wait for ever)
        self._lock = FileLock(str(self.path))
        self._held = False
        self._beats = 0
        self._since = ""
        self._last_beat = 0.0

    def read_record(self) -> dict | None:
        """The holder's record; None when there is none or it cannot be read."""
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def acquire(self) -> None:
        """Take the lock, waiting for its holder as described in the module's docstring."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            self._wait()
        self._held, self._since, self._beats = True, _now_iso(), 0
        self.beat(force=True)

    def _limit_text(self) -> str:
        if self.wait_s is None:
            return f"waiting for ever ({self.setting}=null)" if self.setting else "waiting for ever"
        return f"giving up after {self.wait_s:g} s without progress ({self.setting})"

    def _wait(self) -> None:
        seen = self.read_record()
        start = last_change = last_note = time.monotonic()
        log.warning("%s: waiting for %s, %s; %s", self.what, self.path,
                    describe_holder(seen, self.record_path), self._limit_text())
        while True:
            timeout = POLL_S if self.wait_s is None else min(POLL_S, self.wait_s - (time.monotonic() - last_change))
            try:
                self._lock.acquire(timeout=max(timeout, 0.01))  # filelock: a negative timeout waits for ever
                return
            except Timeout:
                pass
            now, record = time.monotonic(), self.read_record()
            if record != seen:
                seen, last_change = record, now
            if self.wait_s is not None and now - last_change >= self.wait_s:
                raise InputError(
                    f"{self.what}: gave up waiting for {self.path} after {now - start:.0f} s: "
                    f"{describe_holder(seen, self.record_path)}, no progress for {self.wait_s:g} s "
                    f"({self.setting}={self.wait_s:g}); if that process is stopped or hung, end it and run again "
                    f"(finished shards are kept), or set {self.setting} higher or null (wait for ever)")
            if now - last_note >= NOTE_EVERY_S:
                last_note = now
                log.warning("%s: still waiting for %s (%.0f s so far), %s; %s", self.what, self.path, now - start,
                            describe_holder(seen, self.record_path), self._limit_text())

    def beat(self, force: bool = False) -> None:
        """Refresh the holder record (at most every BEAT_S unless `force`): the waiters' sign of progress."""
        if not self._held or (not force and time.monotonic() - self._last_beat < BEAT_S):
            return
        self._beats += 1
        self._last_beat = time.monotonic()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": slurm_ids().get("job_id"),
                  "since": self._since, "updated": _now_iso(), "progress": self._beats, "building": self.what}
        try:
            atomic_write_json(self.record_path, record)
        except OSError as exc:  # the record only informs the waiters; the build goes on without it
            log.debug("%s: holder record %s not written: %s", self.what, self.record_path, exc)

    def release(self) -> None:
        """Remove the holder record, then release the lock (nothing when not held)."""
        if not self._held:
            return
        self._held = False
        try:
            self.record_path.unlink(missing_ok=True)
        finally:
            self._lock.release()
