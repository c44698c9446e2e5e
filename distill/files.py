"""Atomic file writes (a reader: the report, a resumed cell, a second host, never sees half a file or dir), and
telling a local path from a hub id."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temp name next to `path` for a writer that takes a path (one file, or a whole dir it creates).

    When the block succeeds the temp file or dir is renamed onto `path` (an old dir there is removed first);
    when it fails the temp is removed and `path` is untouched. Readers never see half a result.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same dir + os.replace: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write `text` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def looks_local(path: str) -> bool:
    """Is `path` a filesystem path rather than a hub id ("gpt2", "Qwen/Qwen2.5-7B")? Its prefix says so, or it
    exists (`~` expanded)."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()
