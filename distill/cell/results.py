"""metrics.json, the one record of a cell's result: its one owner reads and writes it.

`distill-train` writes it at the start of every attempt (status running), on a failure or interruption, and at
the end (completed: eval, valid, train, selection); the pipeline and the report read it. A completed result is
never replaced by a worse status, and a garbage file makes its cell count as unfinished, never crash a sweep.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distill.cell.identity import cell_identity
from distill.cell.lock import slurm_ids
from distill.files import atomic_write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"
COMPLETED = "completed"
RECORDED_STATUSES = ("running", COMPLETED, "failed", "interrupted")  # the statuses distill-train writes
GENERATIONS_SUFFIX = ".generations.jsonl"  # <run_dir>/generations/<benchmark><suffix>, written by the evaluation


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


def parse_metrics(text: str, source: str) -> dict[str, Any]:
    """Parse and check one metrics.json (the report's reading of it); raise ValueError saying what is wrong."""
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(m).__name__}")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{source}: schema_version {m.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if m.get("status") not in RECORDED_STATUSES:
        raise ValueError(f"{source}: status {m.get('status')!r}, expected {'|'.join(RECORDED_STATUSES)}")
    cell = m.get("cell")
    if not isinstance(cell, dict) or not {"divergence", "tau", "seed"} <= cell.keys():
        raise ValueError(f"{source}: 'cell' must hold at least divergence, tau and seed")
    if m["status"] == COMPLETED and not isinstance(m.get("eval"), dict):
        raise ValueError(f"{source}: completed cell without an 'eval' object")
    return m


def load_metrics(directory: Path, source: str | None = None) -> dict[str, Any]:
    """The cell's metrics.json, parsed and checked (`parse_metrics`); ValueError or OSError saying what is
    wrong, the file named `source` in the message (default: its path)."""
    path = Path(directory) / METRICS_FILE
    return parse_metrics(path.read_text(), str(path) if source is None else source)


def read_generations(out_dir: str | Path, benchmark: str) -> list[dict]:
    """The lines the evaluation wrote for a benchmark (seed, prompt, output, references, rougeL);
    [] if there is no file. A line that does not parse (a file cut by a kill) is skipped."""
    path = Path(out_dir) / f"{benchmark}{GENERATIONS_SUFFIX}"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


# ---------------------------------------------------------------------------------------------- attempts
def host_info() -> dict[str, Any]:
    """Where this attempt runs: host, pid and the SLURM job/array ids that are set."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm": slurm_ids()}


def initial_metrics(cfg: DictConfig, *, name: str, signature: str, config_signature: str, run_dir: Path,
                    inputs: Mapping[str, Any]) -> dict[str, Any]:
    """metrics.json at the start of an attempt: identity, inputs, host, and the attempts so far plus this one.

    `signature` (config + inputs) and `config_signature` (config alone) are the cell's identity, `inputs` its
    input fingerprints; the earlier attempts come from the cell's metrics.json (none when force=true)."""
    previous = None if cfg.force else read_metrics(run_dir)
    attempts = [a for a in (previous or {}).get("attempts") or [] if isinstance(a, dict)]
    for a in attempts:
        if a.get("status") == "running":  # its process died without a word (SIGKILL, node failure)
            a.update(status="stale", note="ended without recording it (killed)")
    attempts.append({"attempt": len(attempts) + 1, **host_info(), "started_at": now_iso(), "start_step": 0,
                     "status": "running"})
    return {
        "schema_version": SCHEMA_VERSION, "status": "running", "signature": signature,
        "config_signature": config_signature, "name": name, "sweep": cfg.sweep_name,
        "cell": cell_identity(cfg, signature), "run_dir": str(run_dir), "inputs": inputs,
        **host_info(), "attempts": attempts,
    }


def write_started(directory: Path, metrics: Mapping[str, Any]) -> None:
    """Write metrics.json as an attempt starts (status running), over whatever is there: a completed result is
    only reached with force=true (which replaces it) or by a caller of `setup` alone (a benchmark)."""
    atomic_write_json(Path(directory) / METRICS_FILE, {**metrics, "updated_at": now_iso()})


def end_attempt(metrics: dict[str, Any], status: str, *, error: str | None = None, **where: Any) -> None:
    """Close this attempt's record in `metrics` (status, end time, `where` it stood: end_step, time_s) and set
    the cell's status (and `error`, for a failed or interrupted attempt)."""
    if metrics.get("attempts"):
        metrics["attempts"][-1].update(status=status, ended_at=now_iso(),
                                       **{k: v for k, v in where.items() if v is not None})
    metrics.update(status=status, **({} if error is None else {"error": error}), updated_at=now_iso())
