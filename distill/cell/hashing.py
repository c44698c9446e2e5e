"""Content hashing: the one way behind every identity (a cell's signature, the teacher cache, seq-KD samples).

Two kinds of digest, each made one way:
- the content of files: sha256 of their bytes, memoised on disk by stat (`DigestCache`), so a 15 GB teacher is
  read once however many cells and caches name it; a set of files is the sha256 of its (relative name, digest)
  lines (`files_digest`);
- a key over values (a config's JSON, encoded token ids, settings): a short sha1 hex prefix (`short_hash`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from filelock import FileLock

from distill.files import atomic_write_json

log = logging.getLogger(__name__)

CACHE_FILE = "fingerprints.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


class DigestCache:
    """sha256 of files, memoised on disk under `<cache_dir>/fingerprints.json` by (path, size, mtime, ctime, inode).

    ctime cannot be set back by a user, so restoring an edited file's mtime does not fool the memo.
    """

    def __init__(self, cache_dir: str | os.PathLike | None) -> None:
        self.path = Path(cache_dir) / CACHE_FILE if cache_dir else None
        self.entries: dict[str, str] = {}
        self.dirty = False
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.entries = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
            except (ValueError, OSError):
                log.warning("fingerprint cache %s is unreadable: rebuilding it", self.path)

    def sha256(self, path: Path) -> str:
        """The sha256 of the file's bytes (read once per stat)."""
        key = _stat_key(path)
        if key not in self.entries:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self.entries[key] = h.hexdigest()
            self.dirty = True
        return self.entries[key]

    def save(self) -> None:
        """Merge our entries into the file under a lock (cells of a grid share it), atomically."""
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=60):
                merged = DigestCache(self.path.parent).entries
                merged.update(self.entries)
                atomic_write_json(self.path, merged)
            self.dirty = False
        except OSError as exc:  # a memo that cannot be written costs time, never a result
            log.warning("fingerprint cache %s not written: %s", self.path, exc)


def files_digest(files: Sequence[Path], root: Path, cache: DigestCache) -> str:
    """sha256 over the (name relative to `root`, content digest) of each file, in the order given."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{Path(f).relative_to(root).as_posix()}\0{cache.sha256(Path(f))}\n".encode())
    return h.hexdigest()


def short_hash(text: str, length: int) -> str:
    """The first `length` hex digits of the sha1 of `text`: the key of a config or of a cache's inputs."""
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def token_digest(sequences: Iterable[Iterable[Sequence[int]]]) -> str:
    """sha1 over integer sequences (each item a group of sequences, e.g. an example's input_ids and labels), as
    64-bit little-endian integers with a separator after each group: the key of what a teacher is run on."""
    h = hashlib.sha1()
    for group in sequences:
        for seq in group:
            h.update(np.asarray(seq, dtype="<i8").tobytes())
        h.update(b"|")
    return h.hexdigest()
