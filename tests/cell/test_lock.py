"""distill/cell/lock.py: one holder at a time, heartbeat (retried when a write fails), stale locks taken over,
live locks never stolen, unreadable records dated by their mtime."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path

import pytest

from distill.cell import lock as locks
from distill.cell.lock import CellLock, Holder, read_holder
from distill.options import CellBusy, LockLost


def _plant(cell: Path, **fields) -> Holder:
    """A lock record as another process would have written it."""
    h = Holder.me(30.0, 300.0)
    for k, v in fields.items():
        setattr(h, k, v)
    cell.mkdir(parents=True, exist_ok=True)
    (cell / locks.LOCK_FILE).write_text(h.to_json())
    return h


def test_acquire_release_and_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = CellLock(tmp_path, heartbeat_s=0.1, stale_after_s=5)
    lock.acquire(wait_s=0)
    rec = json.loads((tmp_path / locks.LOCK_FILE).read_text())
    assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid() and rec["slurm"]["job_id"] == "4242"
    first = rec["updated_at"]
    time.sleep(0.35)
    assert read_holder(tmp_path / locks.LOCK_FILE).updated_at > first  # the heartbeat refreshes it
    other = CellLock(tmp_path, heartbeat_s=0.1, stale_after_s=5)
    assert other.try_acquire().token == lock.me.token  # a live holder keeps it
    lock.release()
    assert not (tmp_path / locks.LOCK_FILE).exists()
    assert other.try_acquire() is None
    other.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp or take-over files left behind


def test_busy_names_the_holder(tmp_path, monkeypatch):
    # the holder's SLURM job is alive: whether or not a SLURM runs here (CI starts one), scontrol must not decide
    monkeypatch.setattr(locks, "slurm_job_state", lambda job_id: "RUNNING")
    _plant(tmp_path, host="node17", pid=999, slurm={"job_id": "123"})
    with pytest.raises(CellBusy, match=r"being run by host node17 pid 999 \(SLURM job 123\), heartbeat \d+ s ago"):
        CellLock(tmp_path).acquire(wait_s=0)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("case", ["old heartbeat", "dead pid", "earlier attempt of this job", "garbage record"])
def test_dead_holders_are_taken_over(case, tmp_path, monkeypatch):
    if case == "old heartbeat":
        _plant(tmp_path, host="elsewhere", updated_at=time.time() - 1000)
        why = "heartbeat is 1000 s old"
    elif case == "dead pid":
        _plant(tmp_path, pid=_dead_pid())
        why = "on this host is gone"
    elif case == "earlier attempt of this job":
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        _plant(tmp_path, host="elsewhere", slurm={"job_id": "77"})
        why = "earlier attempt of this SLURM job"
    else:
        (tmp_path / locks.LOCK_FILE).write_text("{not json")
        os.utime(tmp_path / locks.LOCK_FILE, (time.time() - 1000, time.time() - 1000))
        why = "heartbeat is 1000 s old"
    lock = CellLock(tmp_path)
    assert lock.try_acquire() is None
    assert why in lock.took_over
    assert read_holder(tmp_path / locks.LOCK_FILE).token == lock.me.token
    lock.release()


def test_a_live_holder_on_another_host_is_waited_for_not_stolen(tmp_path):
    _plant(tmp_path, host="elsewhere", pid=1)
    lock = CellLock(tmp_path, heartbeat_s=0.05, stale_after_s=300)
    t0 = time.monotonic()
    with pytest.raises(CellBusy):
        lock.acquire(wait_s=0.3, poll_s=0.05)
    assert time.monotonic() - t0 >= 0.3
    assert read_holder(tmp_path / locks.LOCK_FILE).host == "elsewhere"


def test_a_holder_that_lost_its_lock_knows(tmp_path):
    lock = CellLock(tmp_path, heartbeat_s=100, stale_after_s=300)
    lock.acquire(wait_s=0)
    _plant(tmp_path, host="elsewhere")  # someone judged us dead and took over
    assert lock.beat() is False and lock.lost
    lock.release()
    assert read_holder(tmp_path / locks.LOCK_FILE).host == "elsewhere"  # release leaves the new holder's lock


def _race(cell: str, start: float, out: mp.Queue, all_tried: ProcessEvent) -> None:
    while time.time() < start:
        time.sleep(0.001)
    lock = CellLock(cell, heartbeat_s=100, stale_after_s=300)
    got = lock.try_acquire() is None
    out.put((os.getpid(), got))
    all_tried.wait(timeout=300)  # hold it until every racer has tried, however late a loaded machine starts it
    if got:
        lock.release()


def test_racing_processes_take_a_dead_lock_over_exactly_once(tmp_path):
    _plant(tmp_path, host="elsewhere", updated_at=time.time() - 1000)
    ctx = mp.get_context("fork")
    out, all_tried = ctx.Queue(), ctx.Event()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, out, all_tried)) for _ in range(6)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=300) for _ in procs]
    finally:
        all_tried.set()
    for p in procs:
        p.join(timeout=300)
    assert sum(got for _, got in results) == 1, results


def test_liveness_for_the_report(tmp_path):
    assert "no process holds its lock" in locks.liveness(tmp_path)
    _plant(tmp_path, host="elsewhere", updated_at=time.time() - 1000)
    assert "heartbeat is 1000 s old" in locks.liveness(tmp_path)
    _plant(tmp_path, host="elsewhere")
    assert locks.liveness(tmp_path) is None


# ----------------------------------------------------------------------------------------------- failing writes
def _failing_writes(monkeypatch, failures: int | None, code: int = errno.ENOSPC) -> tuple[dict, threading.Event]:
    """The lock's atomic write raises OSError(`code`) `failures` times (None: every time), then writes again;
    the event is set by the first write that succeeds after a failure."""
    real = locks.atomic_write_text
    state = {"failed": 0}
    recovered = threading.Event()

    def write(path, text):
        if failures is None or state["failed"] < failures:
            state["failed"] += 1
            raise OSError(code, os.strerror(code))
        real(path, text)
        if state["failed"]:
            recovered.set()

    monkeypatch.setattr(locks, "atomic_write_text", write)
    return state, recovered


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE])
def test_a_heartbeat_write_that_fails_for_a_while_is_retried_and_the_lock_stays_held(code, tmp_path, monkeypatch):
    state, recovered = _failing_writes(monkeypatch, failures=3, code=code)
    lock = CellLock(tmp_path, heartbeat_s=0.05, stale_after_s=300)
    lock.acquire(wait_s=0)
    try:
        first = read_holder(tmp_path / locks.LOCK_FILE).updated_at
        assert recovered.wait(timeout=300), "the heartbeat never wrote again"
        assert state["failed"] == 3
        assert lock._thread is not None and lock._thread.is_alive()  # the thread survived the failures
        assert not lock.lost and lock.holds()
        assert read_holder(tmp_path / locks.LOCK_FILE).updated_at > first  # refreshed again
        other = CellLock(tmp_path, heartbeat_s=0.05, stale_after_s=300)
        assert other.try_acquire().token == lock.me.token  # a second run still finds a live holder
    finally:
        lock.release()
    assert not (tmp_path / locks.LOCK_FILE).exists()


def test_a_heartbeat_that_cannot_refresh_for_stale_after_s_loses_the_lock(tmp_path, monkeypatch):
    _failing_writes(monkeypatch, failures=None)
    lock = CellLock(tmp_path, heartbeat_s=0.05, stale_after_s=0.5)
    lock.acquire(wait_s=0)
    written = read_holder(tmp_path / locks.LOCK_FILE).updated_at
    lock._thread.join(timeout=300)  # the heartbeat gives up once the record could be taken over
    assert not lock._thread.is_alive()
    assert lock.lost and not lock.holds() and "could not be refreshed" in lock.lost_why
    assert read_holder(tmp_path / locks.LOCK_FILE).updated_at == written  # a failed write changed nothing
    with pytest.raises(LockLost, match=r"no longer holds the cell's lock \(its record could not be refreshed for "
                                       r"\d+ s \(stale after 0.5 s\)\): stopped before writing metrics.json"):
        lock.ensure_held("writing metrics.json")
    lock.release()


def test_holds_reads_the_lock_file_afresh(tmp_path):
    """A holder that was paused and taken over learns it before its next write, not at its next heartbeat."""
    lock = CellLock(tmp_path, heartbeat_s=100, stale_after_s=300)
    lock.acquire(wait_s=0)
    assert lock.holds()
    _plant(tmp_path, host="elsewhere")
    assert not lock.holds() and lock.lost and "host elsewhere" in lock.lost_why
    with pytest.raises(LockLost, match=r"host elsewhere pid \d+, heartbeat \d+ s ago holds it now"):
        lock.ensure_held("writing metrics.json")
    lock.release()
    assert read_holder(tmp_path / locks.LOCK_FILE).host == "elsewhere"


# ----------------------------------------------------------------------------------------------- garbage records
def _record(**fields) -> str:
    return json.dumps({**json.loads(Holder.me(30.0, 300.0).to_json()), **fields})


GARBAGE = {
    "timestamp 'yesterday'": _record(updated_at="yesterday"),
    "timestamp NaN": _record(updated_at=float("nan")),
    "started_at null": _record(started_at=None),
    "pid a string": _record(pid="12"),
    "stale_after_s a string": _record(stale_after_s="5 min"),
    "slurm a number": _record(slurm=5),
    "an unknown field": _record(colour="red"),
    "a JSON list": "[1, 2]",
    "not JSON": "yesterday, by somebody",
    "not UTF-8": "\udcff\udcfe{",
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_a_garbage_record_turns_stale_by_its_mtime_and_is_never_a_traceback(case, tmp_path):
    path = tmp_path / locks.LOCK_FILE
    path.write_bytes(GARBAGE[case].encode("utf-8", errors="surrogateescape"))
    # freshly written: nobody's, but maybe being written; refused with one line
    with pytest.raises(CellBusy) as busy:
        CellLock(tmp_path, heartbeat_s=1, stale_after_s=60).acquire(wait_s=0)
    assert "\n" not in str(busy.value)
    assert f"{tmp_path} is being run by an unreadable lock record (written " in str(busy.value)
    assert "taken over, once it is 60 s old" in str(busy.value)
    assert locks.liveness(tmp_path) is None
    # written long ago: stale by its mtime, taken over
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    assert "heartbeat is 1000 s old" in locks.liveness(tmp_path)
    lock = CellLock(tmp_path, heartbeat_s=1, stale_after_s=60)
    assert lock.try_acquire() is None
    assert lock.took_over.startswith("an unreadable lock record (written 1000 s ago")
    assert read_holder(path).token == lock.me.token
    lock.release()
