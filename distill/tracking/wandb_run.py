"""Experiment tracking: one W&B run per cell (offline by default) plus a local JSONL log.

Rank 0 only: other ranks get a tracker whose methods do nothing.

What a cell's W&B run looks like (the dashboard and `distill.report.wandb.records_from_wandb` read this):

- id `<sweep>-<cell name>-<signature>` (`run_id`), group = sweep, `job_type` teacher-sft / student-sft /
  distill, config = the resolved Hydra config, nested, with tau and the other float fields as floats.
- history, one naming scheme (slash): `train/<loss|ce|kd|lr|tokens|tokens_per_s>` every log_every steps,
  `valid/<ce|fkl|rkl>` at each validation, and once at the end, in one row at the last step:
  `tau` (the x axis of "ROUGE-L vs tau" panels), `eval/<benchmark>/<rougeL|rougeL_std|exact_match>`,
  the final `valid/*`, and `eval/<benchmark>/generations` (a wandb.Table: seed, prompt, output,
  references, score). `define_metric` puts eval/* on the tau axis; the summary is each metric's last
  value (W&B's default), i.e. the final evaluation under the same names; run-level numbers go to
  `train/<steps|time_s|...>`. No dotted duplicates.
- console output captured (`console="wrap"`, offline too): a failed cell shows its traceback.
- files under `<logger.dir>/wandb/` (`<paths.sweep_dir>`: one folder per sweep).

A requeued cell is a new W&B attempt with the same id; `wandb sync` uploads the attempts of one run in
order of start time, appended. Each attempt logs a metric at a step only if no earlier attempt logged
it there or later: before logging, it reads what earlier attempts really put in their `.wandb` files
(`distill.tracking.offline`) and re-logs from the local `train_log.jsonl` what a hard-killed attempt
logged but never wrote to disk (W&B writes 32 KiB blocks, and has no flush). Synced, every step shows once.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from distill.cell.identity import float_fields
from distill.files import atomic_write_text
from distill.options import JOB_TYPES, WANDB_MODES
from distill.secrets import redact_env, secret_env_values
from distill.tracking import offline as wandb_offline

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
MAX_TABLE_ROWS = 2000     # generations per benchmark sent to W&B (all of them stay in generations/)


def run_id(sweep: str, name: str, signature: str) -> str:
    """W&B run id of a cell: the sweep, the cell's readable name and its signature.

    The same cell in another sweep is another W&B run. Characters W&B refuses in ids (``:;,#?/'``
    and spaces) become `_`.
    """
    return re.sub(r"[:;,#?/'\s]", "_", f"{sweep}-{name}-{signature}")


def job_type(kd_ratio: float, configured: str | None = None) -> str:
    """teacher-sft / student-sft / distill: `logger.job_type` if set, else distill unless kd_ratio is 0."""
    if configured:
        if configured not in JOB_TYPES:
            raise ValueError(f"logger.job_type={configured!r} is not one of {JOB_TYPES}")
        return configured
    return "distill" if float(kd_ratio) > 0 else "student-sft"


# metrics.json's per-benchmark eval key -> its W&B name (eval/<benchmark>/<name>); the report reads them back
EVAL_NAMES = {"rougeL_mean": "rougeL", "rougeL_std": "rougeL_std", "exact_match_mean": "exact_match"}


def eval_metrics(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """metrics.json's `eval` block as W&B metrics: eval/<benchmark>/<rougeL|rougeL_std|exact_match>."""
    return {f"eval/{bench}/{name}": float(r[key]) for bench, r in evals.items() for key, name in EVAL_NAMES.items()
            if key in r}


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
        job_type: str | None = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.run = None
        self.log_path = Path(run_dir) / LOG_FILE
        self._wandb_has: dict[str, int] = {}   # metric -> last step an earlier attempt put on disk
        if not enabled:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if logger_cfg.get("name", "none") != "wandb":
            return
        mode = str(logger_cfg.get("mode") or "offline")
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={mode!r} is not one of {WANDB_MODES}")
        import wandb

        _use_own_wandb_service()
        wandb_dir = Path(logger_cfg.get("dir") or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        earlier = wandb_offline.run_files(wandb_dir, run_id)
        for path in earlier:   # attempts of this cell are never concurrent: the earlier ones are dead
            if (cut := wandb_offline.repair(path)):
                log.info("W&B file of a killed attempt ended in a torn record: cut %d bytes (%s)", cut, path)
        self._wandb_has = wandb_offline.logged_steps(earlier)
        _after_the_last_attempts_second(earlier)
        init = dict(
            project=logger_cfg.get("project", "distill"),
            entity=logger_cfg.get("entity"),
            group=group,
            job_type=job_type,
            name=name,
            id=run_id,
            resume="allow",
            tags=list(tags) + list(logger_cfg.get("tags") or []),
            config=float_fields(redact_env(json.loads(json.dumps(dict(config), default=str)), secret_env_values(os.environ))),
            dir=str(wandb_dir),
            reinit="finish_previous",  # in-process multirun: never log into the previous cell's run
        )
        self.run = _init_run(wandb, init, mode, float(logger_cfg.get("init_timeout_s") or 30))
        # eval/* is drawn against tau. Summaries stay W&B's default, the last value logged: the final
        # evaluation and validation, under their own names (summary="last" would nest them as `.last`).
        self.run.define_metric("tau")
        self.run.define_metric("eval/*", step_metric="tau")
        self._replay_local_log()   # a resumed cell: what earlier attempts logged but W&B never got

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one record to the local log and send to W&B what no earlier attempt sent."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._to_wandb(metrics, step)

    def log_final(self, metrics: Mapping[str, float], step: int, tau: float,
                  generations: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> None:
        """The end-of-cell row: final validation + evaluation, `tau`, and the generations tables.

        One row, so that a kill cannot leave half of it in W&B; `tau` in that row is what a
        "ROUGE-L vs tau" line panel puts on its x axis.
        """
        if not self.enabled:
            return
        self.log({**metrics, "tau": float(tau)}, step)
        if self.run is not None and generations:
            tables = {f"eval/{bench}/generations": _generations_table(rows) for bench, rows in generations.items()}
            self._safely(lambda: self.run.log(tables, step=step))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Run-level numbers (not time series): slash keys like the history, e.g. `train/time_s`."""
        if self.run is not None:
            self._safely(lambda: self.run.summary.update(dict(metrics)))

    def _to_wandb(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.run is None:
            return
        new = {k: v for k, v in metrics.items() if step > self._wandb_has.get(k, -1)}
        if new:
            self._safely(lambda: self.run.log(new, step=step))

    def _replay_local_log(self) -> None:
        """Send to W&B what an earlier attempt logged locally but never got onto W&B's disk."""
        if not self.log_path.is_file():
            return
        replayed, sent = 0, dict(self._wandb_has)
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (ValueError, KeyError, TypeError):   # a line cut by the kill
                continue
            new = {k: v for k, v in record.items() if step > sent.get(k, -1)}
            if new and self.run is not None:
                self._safely(lambda: self.run.log(new, step=step))  # noqa: B023 (called right here)
                replayed += 1
            for k in record:
                sent[k] = max(sent.get(k, -1), step)
        self._wandb_has = sent   # this attempt recomputes those steps: they are in W&B already
        if replayed:
            log.info("W&B: re-logged %d rows an earlier attempt had logged but not written", replayed)

    def _safely(self, call) -> None:
        # Tracking must never fail a cell: on SLURM preemption every process of the job gets the
        # signal, W&B's service included, and the next log raises. Keep the local log; drop W&B.
        # Only what a lost or refusing service raises is caught: a bug in our call still fails loudly.
        try:
            call()
        except _tracking_errors() as exc:
            log.warning("wandb stopped logging for this attempt (%s); the local log goes on", exc)
            self.run = None

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run; always called on the way out (success or failure) so the next cell gets a fresh run."""
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except _tracking_errors() as exc:  # a tracking failure must not mask the training result
                log.warning("wandb finish failed: %s", exc)
            self.run = None


def _init_run(wandb: Any, init: dict[str, Any], mode: str, timeout_s: float) -> Any:
    """`wandb.init`; online, within `timeout_s`, and when W&B cannot be reached the cell logs offline instead
    (one warning: `wandb sync` uploads it later) rather than failing after all its setup."""
    def start(run_mode: str) -> Any:
        return wandb.init(**init, mode=run_mode,
                          settings=wandb.Settings(console="wrap", silent=True, init_timeout=timeout_s))

    if mode != "online":
        return start(mode)
    try:
        return start("online")
    except _tracking_errors() as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        log.warning("W&B could not be reached within %.0f s (%s): this cell logs offline to %s; upload it later "
                    "with `wandb sync`", timeout_s, first, init["dir"])
        wandb.teardown()  # the failed online run still holds its id in the W&B service
        return start("offline")


def wandb_key_available() -> bool:
    """Is there a W&B API key W&B would use without asking: WANDB_API_KEY, or a ~/.netrc entry for its host?"""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).split("/")[0]
    try:
        return netrc.netrc().authenticators(host.split(":")[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _after_the_last_attempts_second(earlier: Sequence[Path]) -> None:
    """Wait until the clock has left the second the last attempt's W&B folder is named by.

    W&B names a run's folder `offline-run-<start second>-<run id>`: an attempt that starts within the same second
    as the one before it (a fast resume) would write into that attempt's folder and replace its records.
    """
    if earlier:
        while time.strftime("%Y%m%d_%H%M%S") in earlier[-1].parent.name:
            time.sleep(0.02)


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """What a W&B call raises when its service is gone or refuses: W&B's own errors, and OS errors (broken
    pipe, connection reset, a full disk under the offline run dir)."""
    from wandb.errors import Error as WandbError

    return (WandbError, OSError)


def _generations_table(rows: Sequence[Mapping[str, Any]]):
    """wandb.Table of generations: seed, prompt, output, references (one per line), score."""
    import wandb

    table = wandb.Table(columns=["seed", "prompt", "output", "references", "score"])
    for r in list(rows)[:MAX_TABLE_ROWS]:
        refs = r.get("references") or []
        table.add_data(r.get("seed"), r.get("prompt", ""), r.get("output", ""),
                       "\n".join(refs) if isinstance(refs, list) else str(refs), float(r.get("rougeL", float("nan"))))
    return table


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
