"""The teacher cache's shard files: their layout over the examples, and checksums that make damage visible.

A shard is ``shard-<start>-<stop>.safetensors`` (examples start..stop-1). It is serialised in memory, its sha256
and size are taken of those bytes (what was meant to be on disk), and it is written atomically; then a small
record of that checksum is written beside it (``<shard>.checksum.json``), so that the shards of an interrupted
build can be verified before they are reused. The index of a finished cache carries each shard's checksum.

A shard is verified before a cell trusts it: a missing, truncated or altered file is found, not trained on. The
sha256 of a file is memoised in this process by its stat (path, size, mtime, ctime, inode:
`distill.cell.hashing.DigestCache`), so each shard is read once per process, however many cells open it.
`plan_build` says which shards a cell must (re)build: none for a whole cache (read without the lock), else the
missing and damaged ones, found again under the cache's build lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save

from distill.cell.hashing import DigestCache
from distill.files import atomic_write_bytes, atomic_write_json
from distill.options import InputError
from distill.teachers.build_lock import BuildLock

log = logging.getLogger(__name__)

SHARD_EXAMPLES = 1024  # examples per shard file at most (fewer, so that every rank gets equal work)

# Verdicts are per process: another process (or a later run) hashes the file again, so damage done after a
# verdict is found by the next cell that opens the cache.
_DIGESTS = DigestCache(None)


def shard_plan(n_examples: int, world: int, shard_examples: int = SHARD_EXAMPLES) -> list[tuple[int, int]]:
    """Contiguous example ranges of at most `shard_examples`, as many as a multiple of `world` allows, so that
    ranks taking shards r, r + world, ... get nearly equal work."""
    world = max(world, 1)
    rounds = max(1, -(-n_examples // (world * shard_examples)))
    size = max(1, -(-n_examples // (world * rounds)))
    return [(start, min(start + size, n_examples)) for start in range(0, n_examples, size)]


def shard_name(start: int, stop: int) -> str:
    """The file name of the shard holding examples start..stop-1."""
    return f"shard-{start:09d}-{stop:09d}.safetensors"


def checksum_path(path: Path) -> Path:
    """Where the checksum record of the shard at `path` is kept."""
    return path.with_name(path.name + ".checksum.json")


def write_checked(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> dict[str, object]:
    """Write a shard atomically, then its checksum record; return the record ({"sha256", "bytes"})."""
    data = save(tensors, metadata=metadata)
    record = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    atomic_write_bytes(path, data)
    atomic_write_json(checksum_path(path), record)
    return record


def read_checksum(path: Path) -> dict[str, object] | None:
    """The checksum record written with the shard at `path`; None when there is none (or it is unreadable)."""
    try:
        record = json.loads(checksum_path(path).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("sha256"), str) and isinstance(record.get("bytes"), int)
    return record if ok else None


def shard_problem(path: Path, record: dict | None) -> str | None:
    """What is wrong with the shard at `path` against its checksum `record` ({"sha256", "bytes"}), or None."""
    if not record or not isinstance(record.get("sha256"), str):
        return "has no checksum (written before the cache kept checksums)"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if record.get("bytes") is not None and size != record["bytes"]:
        return f"has {size} bytes, not the {record['bytes']} written (truncated or overwritten)"
    try:
        digest = _DIGESTS.sha256(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if digest != record["sha256"]:
        return "does not match its checksum (its contents were altered)"
    return None


# --------------------------------------------------------------------------------------------- the whole cache
@dataclass
class Survey:
    """What a cache dir holds: its shards (with their checksums where known), those that must be (re)built with
    why ("" for a shard an interrupted build had not written yet: no damage), and what is wrong with its index."""

    shards: list[dict]
    todo: list[tuple[dict, str]] = field(default_factory=list)
    indexed: bool = False
    index_problem: str | None = None


def read_index(root: Path, n_examples: int, version: str) -> tuple[dict | None, str | None]:
    """(the index of the cache at `root`, None) when it is usable; (None, what is wrong with it) otherwise;
    (None, None) when there is none (never built, or its build was interrupted)."""
    path = root / "index.json"
    if not path.exists():
        return None, None
    try:
        index = json.loads(path.read_text())
        shards = [(int(s["start"]), int(s["stop"])) for s in index["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"cannot be read ({exc})"
    if str(index.get("format")) != version:
        return None, f"is of format {index.get('format')}, not {version}"
    if index.get("n_examples") != n_examples or [a for a, _ in shards] != [0] + [b for _, b in shards[:-1]] \
            or (shards[-1][1] if shards else 0) != n_examples:
        return None, f"does not cover the {n_examples} examples in order"
    return index, None


def survey(root: Path, plan: list[tuple[int, int]], n_examples: int, version: str,
           beat: Callable[[], None]) -> Survey:
    """Verify the cache at `root`: against its index's checksums, or (no usable index) the shards of `plan`
    already written against their checksum records (kept when they verify). `beat` after each shard."""
    index, problem = read_index(root, n_examples, version)
    if index is not None:
        found = Survey(index["shards"], indexed=True)
        for shard in found.shards:
            if why := shard_problem(root / shard["file"], shard):
                found.todo.append((shard, why))
            beat()
        return found
    found = Survey([], index_problem=problem)
    for a, b in plan:
        path = root / shard_name(a, b)
        record = read_checksum(path)
        shard = {"file": path.name, "start": a, "stop": b, **(record or {})}
        found.shards.append(shard)
        if not path.exists():
            found.todo.append((shard, ""))
        elif record is None:
            found.todo.append((shard, "has no checksum record (its writer stopped before writing it)"))
        elif why := shard_problem(path, record):
            found.todo.append((shard, why))
        beat()
    return found


def index_entry(root: Path, shard: dict, rebuilt: bool) -> dict:
    """A shard's line of the index: its range and, for a shard just written, the checksum its writer recorded."""
    record = read_checksum(root / shard["file"]) if rebuilt else shard
    entry = {"file": shard["file"], "start": shard["start"], "stop": shard["stop"]}
    if record:  # no record (it could not be read back): the next cell finds no checksum and rebuilds the shard
        entry.update(sha256=record.get("sha256"), bytes=record.get("bytes"))
    return entry


def plan_build(root: Path, plan: list[tuple[int, int]], n_examples: int, version: str,
               lock: BuildLock) -> tuple[list[dict], list[dict] | None]:
    """(all the cache's shards, those to build). None to build when the cache is whole and verifies: it was
    read without the lock. Otherwise the lock is taken (held on for the build), the cache verified again under it,
    and the shards to build listed: maybe none (another cell finished it: None; only the index to write: [])."""
    found = survey(root, plan, n_examples, version, lock.beat)
    if found.indexed and not found.todo:
        return found.shards, None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as exc:  # a read-only cache dir: the cache cannot be built or repaired here
        damaged = [f"{s['file']} {why}" for s, why in found.todo if why]
        what = (f"shard {damaged[0]}" + (f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else "")
                if found.indexed and damaged else "it is not built (or not whole)")
        raise InputError(f"teacher cache {root}: {what}, and {root.parent} is not writable to rebuild it "
                         f"({exc.strerror or exc}): make it writable or point paths.cache_dir at a writable dir "
                         "(loss.teacher_cache=false uses the live teacher)") from exc
    found = survey(root, plan, n_examples, version, lock.beat)  # another cell may have built or repaired it
    if found.indexed and not found.todo:
        return found.shards, None
    if found.index_problem:
        log.warning("teacher cache %s: index.json %s: writing it again (the shards that do not verify are rebuilt)",
                    root.name, found.index_problem)
    for shard, why in found.todo:
        if why:
            log.warning("teacher cache %s: shard %s %s: rebuilding it", root.name, shard["file"], why)
    return found.shards, [s for s, _ in found.todo]
