"""metrics.json, the one record of a cell's result: its one owner reads and writes it.

`distill-train` writes it at the start of every attempt (status running), on a failure or interruption, and at
the end (completed: eval, valid, train, selection); the pipeline and the report read it. A completed result is
never replaced by a worse status, and a garbage file makes its cell count as unfinished, never crash a sweep.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill.files import atomic_write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"


def read_metrics(directory: Path) -> dict | None:
    """The cell's metrics.json, or None if absent or unusable (not UTF-8, not JSON, not an object: warned).

    A garbage metrics.json makes its cell count as unfinished: it is rerun (resuming any checkpoint), never
    trusted, and never crashes a sweep.
    """
    path = Path(directory) / METRICS_FILE
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError, OSError) as exc:
        log.warning("%s is unreadable (%s): the cell counts as unfinished", path, str(exc).splitlines()[0][:120])
        return None
    if not isinstance(data, dict):
        log.warning("%s holds a JSON %s, not an object: the cell counts as unfinished", path, type(data).__name__)
        return None
    return data


def is_completed(directory: Path) -> bool:
    """True when the cell already has a completed result (it is then skipped unless force=true)."""
    metrics = read_metrics(directory)
    return bool(metrics) and metrics.get("status") == "completed"


def write_metrics(directory: Path, metrics: Mapping[str, Any]) -> bool:
    """Atomically write the cell's metrics.json, unless that would put an unfinished or failed status over
    a completed result (a failing twin, an error after completion). Returns whether it was written."""
    if metrics.get("status") != "completed" and is_completed(directory):
        log.warning("%s is completed: not replacing it with status %r", Path(directory) / METRICS_FILE,
                    metrics.get("status"))
        return False
    atomic_write_json(Path(directory) / METRICS_FILE, dict(metrics))
    return True


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
