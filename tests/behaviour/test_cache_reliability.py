"""The teacher cache cannot be silently wrong or stuck: altered, truncated and missing shards are found
and rebuilt (or refused in one line where they cannot be), a complete cache is read from a read-only dir, and a
cell waiting for a stopped builder says so and gives up.

Each test builds a real cache (a tiny GPT-2 teacher, 10 examples in shards of 4) and damages or blocks it the way
a disk, a user or a stopped job would.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.cell import hashing
from distill.options import InputError
from distill.teachers import build_lock
from distill.teachers import cache as tc
from distill.teachers.build_lock import BuildLock
from tests.teachers.test_cache import _build, _examples, teacher  # noqa: F401 (teacher: the fixture)

ROOT = Path(__file__).resolve().parents[2]
SHARDS = dict(kind="hidden", shard_examples=4)  # 10 examples: shards 0-4, 4-8, 8-10
MIDDLE = "shard-000000004-000000008.safetensors"  # 4 examples: 2 batches of the tests' batch size 3


@pytest.fixture
def recomputed(monkeypatch) -> list[int]:
    """The sizes of the batches the teacher is run on from now on (the shards rebuilt)."""
    seen: list[int] = []
    real = tc._batch_values
    monkeypatch.setattr(tc, "_batch_values",
                        lambda t, batch, *a: seen.append(len(batch["labels"])) or real(t, batch, *a))
    return seen


def _rows(cache) -> list[torch.Tensor]:
    """Copies of every example's rows (the cache maps its files: a row read in place would change with them)."""
    return [cache.rows(i).clone() for i in range(cache.n_examples)]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("distill.teachers")]


def _alter_values(path: Path) -> None:
    """Overwrite the first cached value of a shard in place; the header (names, shapes, offsets) stays intact."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8:8 + header_len])["values"]["data_offsets"][0]
    data[start:start + 4] = torch.tensor([1000.0]).numpy().tobytes()
    path.write_bytes(bytes(data))


def _read_only(monkeypatch, directory: Path) -> None:
    """`directory` read-only: chmod 0o555, and, since the tests run as root (root ignores permission bits), every
    os.open for writing below it raises PermissionError, as on a read-only mount (the lock file cannot be made)."""
    directory.chmod(0o555)
    real = os.open

    def refuse(path, flags, *args, **kwargs):
        if str(path).startswith(str(directory)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)


def _tree(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


# ---------------------------------------------------------------------------------------------------------
# 1. altered values: found by the checksum, rebuilt


def test_a_shard_with_altered_values_is_found_and_rebuilt(teacher, tiny_tokenizer, tmp_path, caplog, recomputed):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    want = _rows(cache)
    shard = cache.root / MIDDLE
    before = {k: v.clone() for k, v in load_file(str(shard)).items()}  # a copy: load_file maps the file
    _alter_values(shard)
    damaged = load_file(str(shard))  # what a cell would train on without the check: loads fine, values wrong
    assert torch.equal(damaged["offsets"], before["offsets"]) and not torch.equal(damaged["values"], before["values"])
    recomputed.clear()
    with caplog.at_level(logging.INFO):
        again = _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    assert _warnings(caplog) == [f"teacher cache {cache.root.name}: shard {MIDDLE} does not match its checksum "
                                 "(its contents were altered): rebuilding it"]
    assert recomputed == [3, 1]  # only the damaged shard's 4 examples
    assert all(torch.equal(a, b) for a, b in zip(_rows(again), want))


def test_each_shard_is_read_once_per_process_and_an_edit_that_keeps_the_mtime_is_still_found(
        teacher, tiny_tokenizer, tmp_path, caplog, monkeypatch):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    hashed: list[str] = []
    real_open = open
    monkeypatch.setattr(hashing, "open", lambda p, *a, **k: hashed.append(Path(p).name) or real_open(p, *a, **k),
                        raising=False)
    _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)  # the first open after the build verifies
    shards = sorted(p.name for p in cache.root.glob("shard-*.safetensors"))
    assert sorted(n for n in hashed if n.startswith("shard-")) == shards
    hashed.clear()
    _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    assert [n for n in hashed if n.startswith("shard-")] == []  # the verdicts are remembered
    shard = cache.root / MIDDLE
    st = shard.stat()
    _alter_values(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: the ctime still moved
    with caplog.at_level(logging.WARNING):
        _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    assert [w for w in _warnings(caplog) if MIDDLE in w and "does not match its checksum" in w]


def test_a_cache_without_checksums_is_rebuilt_once(teacher, tiny_tokenizer, tmp_path, caplog, recomputed):
    """An index of a cache made before checksums (none per shard) vouches for nothing: every shard is rebuilt once,
    then reused. (Caches of format 2 are not even found: the key includes FORMAT_VERSION, now 3.)"""
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    index_path = cache.root / "index.json"
    index = json.loads(index_path.read_text())
    assert index["format"] == tc.FORMAT_VERSION == "3" and all(len(s["sha256"]) == 64 for s in index["shards"])
    index["shards"] = [{k: s[k] for k in ("file", "start", "stop")} for s in index["shards"]]
    index_path.write_text(json.dumps(index))
    recomputed.clear()
    with caplog.at_level(logging.WARNING):
        _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    assert len(_warnings(caplog)) == 3 and all("has no checksum" in w for w in _warnings(caplog))
    assert sum(recomputed) == len(examples)
    recomputed.clear()
    caplog.clear()
    _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    assert recomputed == [] and _warnings(caplog) == []


# ---------------------------------------------------------------------------------------------------------
# 2. truncated or missing shards: rebuilt under the lock, or refused in one line


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_truncated_or_missing_shard_is_rebuilt_with_one_warning(damage, teacher, tiny_tokenizer, tmp_path, caplog,
                                                                  recomputed):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    want = _rows(cache)
    shard = cache.root / MIDDLE
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    recomputed.clear()
    with caplog.at_level(logging.INFO):
        again = _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    [warning] = _warnings(caplog)
    assert MIDDLE in warning and warning.endswith("rebuilding it")
    assert ("has 100 bytes, not the" in warning) if damage == "truncated" else ("is missing" in warning)
    assert recomputed == [3, 1]
    assert all(torch.equal(a, b) for a, b in zip(_rows(again), want))
    recomputed.clear()
    caplog.clear()
    _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)  # repaired for good: the next cell is quiet
    assert recomputed == [] and _warnings(caplog) == []


def test_an_unreadable_index_is_written_again_from_the_shards_that_verify(teacher, tiny_tokenizer, tmp_path, caplog,
                                                                         recomputed):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    want, index = _rows(cache), json.loads((cache.root / "index.json").read_text())
    (cache.root / "index.json").write_text('{"format": "3", "shards": [')  # half an index
    recomputed.clear()
    with caplog.at_level(logging.WARNING):
        again = _build(teacher, examples, tmp_path, tiny_tokenizer, **SHARDS)
    [warning] = _warnings(caplog)
    assert "index.json cannot be read" in warning and "writing it again" in warning
    assert recomputed == []  # each shard verified against the checksum record written with it
    assert json.loads((cache.root / "index.json").read_text()) == index
    assert all(torch.equal(a, b) for a, b in zip(_rows(again), want))


def test_a_damaged_cache_in_a_read_only_dir_is_refused_in_one_line(teacher, tiny_tokenizer, tmp_path, monkeypatch,
                                                                   recomputed):
    examples = _examples(tiny_tokenizer)
    cache_dir = tmp_path / "cache"
    cache = _build(teacher, examples, cache_dir, tiny_tokenizer, **SHARDS)
    (cache.root / MIDDLE).write_bytes(b"")
    recomputed.clear()
    _read_only(monkeypatch, cache_dir)
    before = _tree(cache_dir)
    with pytest.raises(InputError) as err:
        _build(teacher, examples, cache_dir, tiny_tokenizer, **SHARDS)
    message = str(err.value)
    assert "\n" not in message
    assert f"shard {MIDDLE} has 0 bytes" in message and f"{cache_dir} is not writable" in message
    assert "paths.cache_dir" in message and recomputed == [] and _tree(cache_dir) == before  # nothing written


# ---------------------------------------------------------------------------------------------------------
# 3. a complete cache in a read-only dir


def test_a_complete_cache_in_a_read_only_dir_is_read_without_the_lock(teacher, tiny_tokenizer, tmp_path, monkeypatch,
                                                                      recomputed):
    """Read-only is simulated (chmod 0o555 + os.open refusing writes below the dir: the tests run as root, which
    ignores permission bits); the lock file cannot be created, and is not needed."""
    examples = _examples(tiny_tokenizer)
    cache_dir = tmp_path / "cache"
    cache = _build(teacher, examples, cache_dir, tiny_tokenizer, **SHARDS)
    want = _rows(cache)
    (cache_dir / f"{cache.root.name}.lock").unlink(missing_ok=True)  # none left by the build: it would be created
    recomputed.clear()
    _read_only(monkeypatch, cache_dir)
    before = _tree(cache_dir)
    again = _build(teacher, examples, cache_dir, tiny_tokenizer, **SHARDS)
    assert recomputed == [] and all(torch.equal(a, b) for a, b in zip(_rows(again), want))
    assert _tree(cache_dir) == before
    with pytest.raises(PermissionError):  # the simulation does refuse the lock
        BuildLock(cache_dir / f"{again.root.name}.lock", wait_s=0, what="probe").acquire()


# ---------------------------------------------------------------------------------------------------------
# 4. a stopped builder


_HOLDER = """
import sys, time
from pathlib import Path
from distill.teachers.build_lock import BuildLock
lock = BuildLock(Path(sys.argv[1]), wait_s=None, what="teacher cache (a test's builder)")
lock.acquire()
Path(sys.argv[2]).write_text("held")
while True:
    time.sleep(1)
"""


def _lock_path(teacher, examples, cache_dir: Path) -> Path:
    key = tc.cache_key(teacher[1], examples, torch.float32, "hidden", None, cache_dir)
    return cache_dir / f"teacher-{key}.lock"


def test_a_cell_waiting_for_a_stopped_builder_names_it_and_gives_up_in_one_line(teacher, tiny_tokenizer, tmp_path,
                                                                                caplog):
    examples = _examples(tiny_tokenizer)
    cache_dir = tmp_path / "cache"
    lock_path = _lock_path(teacher, examples, cache_dir)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_path), str(ready)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the holder did not take the lock"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)  # the builder stops while it holds the lock
        with caplog.at_level(logging.INFO), pytest.raises(InputError) as err:
            _build(teacher, examples, cache_dir, tiny_tokenizer, **SHARDS, wait_s=1)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=300)
    first = _warnings(caplog)[0]
    assert f"waiting for {lock_path}" in first and f"pid {proc.pid}" in first
    assert "giving up after 1 s without progress (loss.teacher_cache_wait_s)" in first
    message = str(err.value)
    assert "\n" not in message and "gave up waiting for" in message and f"pid {proc.pid}" in message
    assert "no progress for 1 s (loss.teacher_cache_wait_s=1)" in message and "end it and run again" in message
    assert not (cache_dir / lock_path.stem).exists()  # nothing built


def test_a_waiting_cell_says_so_again_and_waits_as_long_as_the_builder_progresses(teacher, tiny_tokenizer, tmp_path,
                                                                                  monkeypatch):
    """A fast clock (each reading 10,000 s later than the last, beyond the default limit of 3600 s): without
    progress the first look gives up, so each look that goes on was bought by one sign of progress."""
    examples = _examples(tiny_tokenizer)
    cache_dir = tmp_path / "cache"
    holder = BuildLock(_lock_path(teacher, examples, cache_dir), wait_s=None, what="a test's builder")
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:  # a FileLock is held per thread: taken and released in this one
        holder.acquire()
        taken.set()
        done.wait(300)
        holder.release()

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(300)
    clock = iter(range(0, 10 ** 12, 10_000))
    monkeypatch.setattr(build_lock, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    messages: list[str] = []

    class Builder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
            if len(messages) <= 3:
                holder.beat(force=True)  # the builder works on between the waiter's looks, three times

    handler = Builder(level=logging.WARNING)
    logging.getLogger(build_lock.__name__).addHandler(handler)
    try:
        with pytest.raises(InputError, match="no progress for 3600 s"):
            _build(teacher, examples, cache_dir, tiny_tokenizer, **SHARDS)
    finally:
        logging.getLogger(build_lock.__name__).removeHandler(handler)
        done.set()
        thread.join(300)
    assert messages[0].startswith(f"teacher cache {_lock_path(teacher, examples, cache_dir).stem}: waiting for")
    assert f"pid {os.getpid()}" in messages[0]
    assert len(messages) == 4 and all("still waiting for" in m and f"pid {os.getpid()}" in m for m in messages[1:])
