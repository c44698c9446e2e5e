"""Experiment tracking: one W&B run per cell (offline by default) plus a local JSONL log.

Rank 0 only: other ranks get a tracker whose methods do nothing. The W&B run id is the cell's signature
with resume="allow", so a requeued job continues the same run instead of starting a new one.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

from distill.runs import flatten, redact

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
_MODES = ("offline", "online", "disabled")


class Tracker:
    """Logs scalars to `<run_dir>/train_log.jsonl` and, when configured, to W&B."""

    def __init__(
        self,
        logger_cfg: Mapping[str, Any],
        *,
        run_id: str,
        name: str,
        group: str,
        tags: list[str],
        config: Mapping[str, Any],
        run_dir: Path,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.run = None
        self.log_path = Path(run_dir) / LOG_FILE
        if not enabled:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if logger_cfg.get("name", "none") != "wandb":
            return
        mode = str(logger_cfg.get("mode") or "offline")
        if mode not in _MODES:
            raise ValueError(f"logger.mode={mode!r} is not one of {_MODES}")
        import wandb

        _use_own_wandb_service()
        wandb_dir = Path(logger_cfg.get("dir") or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger_cfg.get("project", "distill"),
            entity=logger_cfg.get("entity"),
            group=group,
            name=name,
            id=run_id,
            resume="allow",
            tags=list(tags) + list(logger_cfg.get("tags") or []),
            config=flatten(redact(dict(config))),
            dir=str(wandb_dir),
            mode=mode,
            reinit="finish_previous",  # in-process multirun: never log into the previous cell's run
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one record to the local log and to W&B."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self._safely(lambda: self.run.log(dict(metrics), step=step))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Final results, flattened (W&B summary supports nested keys poorly in tables)."""
        if self.run is not None:
            self._safely(lambda: self.run.summary.update(flatten(dict(metrics))))

    def _safely(self, call) -> None:
        # Tracking must never fail a cell: on SLURM preemption every process of the job gets the
        # signal, W&B's service included, and the next log raises. Keep the local log; drop W&B.
        try:
            call()
        except Exception as exc:
            log.warning("wandb stopped logging for this attempt (%s); the local log goes on", exc)
            self.run = None

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run; always called from a `finally` so the next cell gets a fresh run."""
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as exc:  # a tracking failure must not mask the training result
                log.warning("wandb finish failed: %s", exc)
            self.run = None

    @property
    def run_path(self) -> str | None:
        """Where W&B put this run's files (for `wandb sync`)."""
        return None if self.run is None else os.path.dirname(self.run.dir)


def _use_own_wandb_service() -> None:
    """Drop a WANDB_SERVICE inherited from another process (the submitting shell, a notebook, pytest).

    A requeued cell must not attach to its submitter's W&B service: the killed attempt's run stream
    can stay open there, and the resumed run then fails with "run ID ... is in use". The token
    names the process that started the service ("<version>-<pid>-..."); only our own is kept.
    """
    match = re.match(r"^[^-]+-(\d+)-", os.environ.get("WANDB_SERVICE", ""))
    if match and int(match.group(1)) != os.getpid():
        log.info("ignoring W&B service of process %s: this cell starts its own", match.group(1))
        del os.environ["WANDB_SERVICE"]


def _scalar(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` in a local JSONL log (atomically): a resumed attempt redoes the
    steps after its checkpoint, and each step must be logged once. Unparseable lines (a torn last line) go."""
    from distill.runs import atomic_write_text

    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
