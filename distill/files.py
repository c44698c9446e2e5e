"""Atomic file writes (a reader: the report, a resumed cell, a second host, never sees half a file or dir), and
telling a local path from a hub id."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill.options import OutputError

# The errors of a destination that cannot take a write: the user's to fix (space, quota, permissions), so one line
# saying where and what to do instead of a traceback.
UNWRITABLE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}
TEMP_PART = re.compile(r"(?<![^/])\.([^/]+)\.\d+-[0-9a-f]{8}\.tmp(?=/|$)")  # atomic_path's temp name of a part


def output_error(exc: OSError, path: str | os.PathLike) -> OutputError | None:
    """`exc` (an UNWRITABLE errno) as an OutputError naming `path` and what to do; None for any other error."""
    if isinstance(exc, OutputError) or exc.errno not in UNWRITABLE:
        return None
    path = TEMP_PART.sub(r"\1", str(path))  # a file inside an atomic dir's temp: name the dir it becomes
    todo = ("free space there (or lower trainer.keep_ckpts) or point paths.root at another disk"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable or point paths.root elsewhere")
    err = OutputError(f"cannot write {path}: {UNWRITABLE[exc.errno]} ({errno.errorcode[exc.errno]}): {todo}, "
                      "then rerun (an unfinished cell resumes from its last complete checkpoint)")
    err.errno = exc.errno  # only the errno: with strerror or filename set, OSError's own str() would replace ours
    return err


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temp name next to `path` for a writer that takes a path (one file, or a whole dir it creates).

    When the block succeeds the temp file or dir is renamed onto `path` (an old dir there is removed first);
    when it fails the temp is removed and `path` is untouched. Readers never see half a result. A full disk, a
    quota, a read-only or forbidden dir, in the block or here, is an OutputError naming `path` (`output_error`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if tmp.is_dir() and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        if (err := output_error(exc, path)) is None:
            raise
        raise err from exc
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
