"""distill/locks.py: one holder at a time, heartbeat, stale locks taken over, live locks never stolen."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.cell import lock as locks
from distill.cell.lock import CellLock, Holder, read_holder
from distill.options import CellBusy


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


def _race(cell: str, start: float, out: mp.Queue) -> None:
    while time.time() < start:
        time.sleep(0.001)
    lock = CellLock(cell, heartbeat_s=100, stale_after_s=300)
    got = lock.try_acquire() is None
    out.put((os.getpid(), got))
    time.sleep(0.5)  # hold it while the others look
    if got:
        lock.release()


def test_racing_processes_take_a_dead_lock_over_exactly_once(tmp_path):
    _plant(tmp_path, host="elsewhere", updated_at=time.time() - 1000)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, out)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(got for _, got in results) == 1, results


def test_liveness_for_the_report(tmp_path):
    assert "no process holds its lock" in locks.liveness(tmp_path)
    _plant(tmp_path, host="elsewhere", updated_at=time.time() - 1000)
    assert "heartbeat is 1000 s old" in locks.liveness(tmp_path)
    _plant(tmp_path, host="elsewhere")
    assert locks.liveness(tmp_path) is None
