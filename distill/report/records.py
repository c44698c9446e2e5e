"""The record of one cell as the report reads it, and the cells of a sweep dir.

`scan_sweep(SWEEP_DIR)` reads every `<cell>/metrics.json` (schema_version 1, written by `distill-train`,
read and checked by its owner distill.cell.results) into a `CellResult`, with the status the report gives
it: the recorded one, or what the report itself finds wrong (missing, unreadable, stale, superseded).
`references` finds the teacher and the SFT warm start the students are compared with. The same records
come from W&B in distill.report.wandb.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from distill.cell.lock import liveness
from distill.cell.results import COMPLETED, METRICS_FILE, load_metrics

log = logging.getLogger(__name__)

# status of a cell as the report sees it: the metrics.json states other than completed (RECORDED_STATUSES),
# plus what the report itself can find wrong with a cell dir.
PROBLEM_STATUSES = ("running", "stale", "interrupted", "failed", "missing", "unreadable", "superseded")
CELL_DIR_RE = re.compile(r"^.+-[0-9a-f]{8}$")  # <name>-<8-hex signature>
# per-cell identifiers inside `cell` that say nothing about the objective (never grouped on)
IDENTITY_KEYS = ("signature", "name")


@dataclass
class CellResult:
    """One cell of the sweep as the report found it on disk (or in W&B)."""

    dir: str                      # cell dir name relative to the sweep dir (or W&B run name)
    status: str                   # completed | running | failed | missing | unreadable | superseded
    metrics: dict[str, Any] | None = None
    error: str | None = None      # the job's error, or why the report could not use the cell

    @property
    def label_source(self) -> dict[str, Any]:
        """The cell description without per-cell identifiers (signature); cells written before rollouts
        existed trained on the references: their rollout is 'offline'."""
        cell = {k: v for k, v in (self.metrics or {}).get("cell", {}).items() if k not in IDENTITY_KEYS}
        return {**cell, "rollout": cell.get("rollout") or "offline"} if cell else cell


def read_cell(d: Path) -> CellResult | None:
    """The record of one dir of a sweep; None for a dir that is not a cell (no metrics.json, not named like one).

    A metrics.json that cannot be used (not JSON, or JSON of the wrong shape) makes its cell 'unreadable', kept
    out of the tables and warned about in one line: one bad file never blocks the report of a whole sweep.
    """
    if not (d / METRICS_FILE).is_file():
        if CELL_DIR_RE.match(d.name):
            return CellResult(d.name, "missing", error="no metrics.json (never started or killed before writing)")
        return None
    try:
        m = load_cell_metrics(d, f"{d.name}/{METRICS_FILE}")
    except (ValueError, OSError) as e:
        error = " ".join(str(e).split())  # one line, whatever the parser said
        log.warning("report: skipped an unreadable cell (kept out of the tables): %s", error)
        return CellResult(d.name, "unreadable", error=error)
    dead = liveness(d) if m["status"] == "running" else None
    return CellResult(d.name, "stale", m, f"not running: {dead}") if dead else CellResult(d.name, m["status"], m,
                                                                                          m.get("error"))


def load_cell_metrics(d: Path, source: str | None = None) -> dict[str, Any]:
    """A cell's metrics.json checked for what the report reads of it (`load_metrics`, then `shape_problem`);
    ValueError saying what is wrong, the file named `source` (default: its path)."""
    m = load_metrics(d, source)
    problem = shape_problem(m)
    if problem:
        raise ValueError(f"{source or d / METRICS_FILE}: {problem}")
    return m


# What the report reads of a metrics.json beyond load_metrics' checks, and the type each must have: a number
# given as a string ("40.0") would be grouped as another cell or break a format, a list where a block belongs
# would raise deep in the report. None stands for a key that is absent or null.
_NUMBER, _FINITE = "a number", "a finite number"
_CELL_KEYS = {"divergence": str, "divergence_params": dict, "tau": _FINITE, "tau_target": str, "tau_squared": bool,
              "kd_ratio": _NUMBER, "seed": int, "max_steps": int, "epochs": int, "model": str, "teacher": str,
              "student": str, "dataset": str, "rollout": str}
_EVAL_KEYS = {"rougeL_mean": _NUMBER, "rougeL_std": _NUMBER, "exact_match_mean": _NUMBER, "n": int,
              "rougeL_per_seed": list}
_TOP_KEYS = {"name": str, "sweep": str, "updated_at": str, "error": str, "train": dict, "valid": dict,
             "attempts": list, "eval": dict}
_TYPE_NAMES = {str: "a string", dict: "an object", list: "a list", int: "an integer", bool: "true or false"}


def _wrong(where: str, value: Any, want: Any, required: bool = False) -> str | None:
    """Why `value` at `where` is not `want` (a type, _NUMBER or _FINITE), or None when it is (or is an
    allowed None)."""
    if value is None and not required:
        return None
    if want in (_NUMBER, _FINITE):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (want is _NUMBER or math.isfinite(value))
    else:
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    return None if ok else f"{where} must be {_TYPE_NAMES.get(want, want)}, got {json.dumps(value, default=str)[:40]}"


def _checks(m: dict[str, Any]) -> Iterator[str | None]:
    """One verdict of `_wrong` per field the report reads, blocks before what is inside them."""
    yield from (_wrong(k, m.get(k), t) for k, t in _TOP_KEYS.items())
    yield from (_wrong(f"cell.{k}", m["cell"].get(k), t, k in ("divergence", "tau", "seed"))
                for k, t in _CELL_KEYS.items())
    yield from (_wrong(f"valid.{k}", v, _NUMBER, True) for k, v in (m.get("valid") or {}).items())
    yield from (_wrong(f"attempts[{i}]", a, dict, True) for i, a in enumerate(m.get("attempts") or []))
    for bench, ev in (m.get("eval") or {}).items():
        yield _wrong(f"eval.{bench}", ev, dict, True)
        if isinstance(ev, dict):
            yield from (_wrong(f"eval.{bench}.{k}", ev.get(k), t, k == "rougeL_mean" and m["status"] == COMPLETED)
                        for k, t in _EVAL_KEYS.items())
            yield from (_wrong(f"eval.{bench}.rougeL_per_seed[{i}]", x, _NUMBER, True)
                        for i, x in enumerate(ev.get("rougeL_per_seed") or []))


def shape_problem(m: dict[str, Any]) -> str | None:
    """The first field of a parsed metrics.json (load_metrics) that the report could not use, as 'where must be
    what, got what'; None when every field it reads has its type."""
    return next((why for why in _checks(m) if why), None)


def scan_sweep(sweep_dir: str | os.PathLike) -> list[CellResult]:
    """Find the cells of a sweep dir: subdirs named `<name>-<8hex>` or holding a metrics.json.

    Hidden dirs (.hydra-jobs, .submitit) are not cells. A cell dir without metrics.json is
    'missing'; one whose metrics.json cannot be parsed is 'unreadable'; a 'running' one whose cell
    lock has no live holder (a SIGKILLed job, a dead node: distill.cell.lock) is 'stale'.
    """
    dirs = sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    return dedupe([c for c in map(read_cell, dirs) if c is not None])


def dedupe(cells: list[CellResult]) -> list[CellResult]:
    """Keep one completed cell per identical `cell` description (the latest `updated_at`).

    Two completed dirs with the same cell (e.g. a rerun after a config change the cell
    description does not show) would otherwise count twice as seeds; the older ones are
    marked 'superseded' and listed, not averaged.
    """
    latest: dict[str, CellResult] = {}
    for c in cells:
        if c.status != COMPLETED:
            continue
        key = json.dumps(c.label_source, sort_keys=True)
        other = latest.get(key)
        if other is None or str(c.metrics.get("updated_at", "")) > str(other.metrics.get("updated_at", "")):
            latest[key] = c
    keep = {id(c) for c in latest.values()}
    out = []
    for c in cells:
        if c.status == COMPLETED and id(c) not in keep:
            key = json.dumps(c.label_source, sort_keys=True)
            c = CellResult(c.dir, "superseded", c.metrics, f"same cell as {latest[key].dir}, which is newer")
        out.append(c)
    return out


def attempts(cell: CellResult) -> int:
    """How many attempts (first run + resumes after a preemption, a kill or a failure) a cell took; 0 = unknown."""
    return len((cell.metrics or {}).get("attempts") or [])


def sweep_name(cells: Iterable[CellResult], sweep_dir: str | os.PathLike) -> str:
    """The sweep name the cells recorded, else the sweep dir's name."""
    names = {c.metrics.get("sweep") for c in cells if c.metrics and c.metrics.get("sweep")}
    return names.pop() if len(names) == 1 else Path(sweep_dir).resolve().name


# ----------------------------------------------------------------------------- reference models

@dataclass(frozen=True)
class Reference:
    """A model the sweep's students are compared with: its own cell's scores per benchmark."""

    label: str                  # "teacher" or "SFT warm start" (+ the cell dir when there are several)
    cell_dir: str               # the reference's own run dir
    scores: dict[str, float]    # benchmark -> rougeL_mean


def _model_run_dir(model_path: str, root: Path) -> Path | None:
    """The run dir that exported `model_path` (`<run_dir>/student`), if it is one of ours."""
    p = Path(model_path)
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, root.parent / p]):
        if cand.name == "student" and (cand.parent / METRICS_FILE).is_file():
            return cand.parent
    return None


def _reference_scores(role: str, run_dir: Path) -> dict[str, float] | None:
    """A completed teacher's (or SFT warm start's) scores per benchmark; None if it cannot be one."""
    try:
        m = load_cell_metrics(run_dir)
    except (ValueError, OSError):
        return None
    if m["status"] == COMPLETED and (role == "teacher" or m["cell"]["divergence"] == "sft"):
        return {b: float(e["rougeL_mean"]) for b, e in m["eval"].items()}
    return None


def references(cells: Iterable[CellResult], root: str | os.PathLike) -> list[Reference]:
    """The teacher and the SFT warm start of the sweep's completed cells, read from their own cells.

    `cell.teacher` / `cell.student` are model paths; when a path is a `<run_dir>/student` exported
    by `distill-train` (absolute, or relative to the working dir or to the sweep's output root) and
    that run completed, its scores become a reference line. Hub models and random inits have none.
    """
    found: dict[tuple[str, Path], dict[str, float]] = {}
    for c in cells:
        if c.status != COMPLETED:
            continue
        for role in ("teacher", "student"):
            path = (c.metrics or {}).get("cell", {}).get(role)
            run_dir = _model_run_dir(str(path), Path(root)) if path else None
            if run_dir is None or (role, run_dir) in found:
                continue
            if (scores := _reference_scores(role, run_dir)) is not None:
                found[(role, run_dir)] = scores
    out = []
    for (role, run_dir), scores in sorted(found.items(), key=lambda kv: (kv[0][0] != "teacher", str(kv[0][1]))):
        label = "teacher" if role == "teacher" else "SFT warm start"
        if sum(r == role for r, _ in found) > 1:
            label += f" ({run_dir.name})"
        out.append(Reference(label, str(run_dir), scores))
    return out
