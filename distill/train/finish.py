"""How an attempt ends: completed (`finish`: the selected student, its evaluation, metrics.json), or failed /
interrupted (`failures_recorded`: metrics.json says so and the error propagates).

Every write here first checks that this run still holds the cell's lock (`CellLock.holds`, a fresh read of the
lock file): a run that was paused and taken over stops with LockLost and writes nothing, so it never completes a
cell another run is training, nor deletes its checkpoints. The checkpoints and the selected export stay until
metrics.json says completed: a preemption at any point before that resumes to the same student and numbers.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from distill import models
from distill.cell import preemption as preempt
from distill.cell.lock import CellLock
from distill.cell.results import end_attempt, read_generations, write_metrics
from distill.evaluation import generate as evaluate
from distill.files import atomic_path
from distill.options import LockLost
from distill.tracking import cell_log
from distill.tracking import wandb_run as tracking
from distill.tracking.wandb_run import Tracker
from distill.train import engine as eng
from distill.train.distributed import ensure_lock_held
from distill.train.selection import SELECTED_DIR, evaluate_and_select, selected_dir
from distill.train.state import CellRun
from distill.train.step import checkpoint_state, stop_if_requested

log = logging.getLogger("distill.train")


def finish(cell: CellRun) -> dict[str, Any]:
    """Final validation and selection, the selected student as a plain HF model in `student/` (all ranks), then
    on rank 0 generation + ROUGE-L on every benchmark, metrics.json and the W&B summary. Returns the metrics.

    While the engine lives a SIGTERM/SIGUSR2 stops at a boundary as in the loop: the end of training is saved
    as a checkpoint (trainer.ckpt_every=0 too), so the resumed attempt trains nothing again. During the
    evaluation (rank 0, the engine freed) a signal stops at once."""
    m, p = cell.metrics, cell.progress
    if cell.bar is not None:
        cell.bar.close()
    train_time = time.time() - p.t_start  # this attempt's; time_s adds the earlier attempts' (checkpointed)
    if m.get("attempts"):
        m["attempts"][-1].update(end_step=p.step, time_s=round(train_time, 3))
    end = checkpoint_state(cell)  # the end of training, before the final evaluation: what a signal saves
    final = evaluate_and_select(cell, final=True)
    stop_if_requested(cell, "final evaluation", end)
    _record_training(cell, train_time)
    student_dir = cell.run_dir / "student"
    selected = p.best["step"] if p.best else cell.schedule.max_steps
    _place_student(cell, selected, student_dir)
    _record_selection(cell, selected, final)
    stop_if_requested(cell, "export", end)
    dist.barrier()
    cell.engine = cell.teacher = cell.teacher_engine = cell.cache = None  # free them before evaluation
    preempt.STATE.in_loop = False  # nothing left to checkpoint: from here a signal stops at once
    if preempt.STATE.requested:  # one that came after the last boundary
        raise preempt.Interrupted(int(preempt.STATE.signum or 0))
    if cell.rank == 0:  # evaluation uses no collectives: the other ranks are done
        _evaluate_and_record(cell, student_dir)
    cell.tracker.finish(0)
    return m


def _record_training(cell: CellRun, train_time: float) -> None:
    """metrics.json `train`: steps, tokens, time over all attempts, throughput, peak GPU memory."""
    m, p = cell.metrics, cell.progress
    m["train"].update(steps=cell.schedule.max_steps, tokens=p.tokens, time_s=round(p.time_before + train_time, 3),
                      rollout=cell.rollout.summary(), attempts=len(m.get("attempts") or [1]),
                      tokens_per_s=(p.tokens - p.tokens_at_start) / max(train_time, 1e-9))
    m["train"].setdefault("final_loss", float("nan"))
    if cell.device.type == "cuda":
        m["train"]["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(cell.device) / 2**30, 3)


def _place_student(cell: CellRun, selected: int, student_dir: Path) -> None:
    """The cell's `student/`: the final model exported (all ranks), or a copy of the selected earlier export
    (rank 0). A copy, not a move: the export must outlive a preemption until the cell is completed."""
    ensure_lock_held(cell.lock, cell.run_dir, cell.device, "exporting the student")
    if selected == cell.schedule.max_steps:
        eng.export_hf(cell.engine, cell.tokenizer, student_dir, cell.rank)
    elif cell.rank == 0:  # an earlier evaluation won: its export is the cell's student
        with atomic_path(student_dir) as tmp:
            shutil.copytree(selected_dir(cell.run_dir, selected), tmp)


def _record_selection(cell: CellRun, selected: int, final: dict[str, Any]) -> None:
    """metrics.json `valid` (the selected evaluation's) and `selection` (how, which step, every evaluation)."""
    p = cell.progress
    chosen = next(e for e in reversed(p.evaluations) if e["step"] == selected) if selected != p.step else final
    cell.metrics["valid"] = {k: v for k, v in chosen.items() if k not in ("step", "select")}
    cell.metrics["selection"] = {"by": cell.cfg.trainer.get("select", "last"), "step": selected,
                                 "value": chosen.get("select"), "evaluations": p.evaluations}


def _evaluate_and_record(cell: CellRun, student_dir: Path) -> None:
    """Generation + ROUGE-L on the exported (plain HF) model; metrics.json, W&B, then drop the optimizer state
    and the selected exports. Rank 0 alone: each write asks the lock on its own (no collective)."""
    cfg, m, max_steps = cell.cfg, cell.metrics, cell.schedule.max_steps
    model = models.load_model(student_dir, torch.float32).to(cell.device)
    t0 = time.time()
    # Generated into a private dir that replaces `generations/` only if the lock is still ours by then.
    with atomic_path(cell.run_dir / "generations") as out:
        out.mkdir()
        m["eval"] = evaluate.evaluate_benchmarks(
            model, cell.tokenizer, cell.splits.benchmarks, eval_cfg=OmegaConf.to_container(cfg.eval, resolve=True),
            template=cfg.data.template, max_length=int(cfg.data.max_length),
            max_prompt_length=int(cfg.data.max_prompt_length), out_dir=out,
            truncation_side=str(cfg.data.get("truncation_side", "left")), progress=bool(cfg.trainer.progress),
        )
        _ensure_held(cell.lock, "writing the evaluation")
    generated = sum(r["n"] * len(r["seeds"]) for r in m["eval"].values())
    m["eval_examples_per_s"] = round(generated / max(time.time() - t0, 1e-9), 2)  # batched generation throughput
    end_attempt(m, "completed")
    gens = {b: read_generations(cell.run_dir / "generations", b) for b in m["eval"]}
    _ensure_held(cell.lock, "logging the final evaluation")
    cell.tracker.log_final({**{f"valid/{k}": v for k, v in m["valid"].items()}, **tracking.eval_metrics(m["eval"])},
                           step=max_steps, tau=float(cfg.tau), generations=gens)
    cell.tracker.summary({f"train/{k}": v for k, v in m["train"].items() if isinstance(v, (int, float))})
    _ensure_held(cell.lock, "writing metrics.json")
    write_metrics(cell.run_dir, m)
    _ensure_held(cell.lock, "removing the checkpoints and the selected exports")
    if not cfg.trainer.keep_final_ckpt:
        shutil.rmtree(cell.run_dir / eng.CKPT_DIR, ignore_errors=True)
    shutil.rmtree(cell.run_dir / SELECTED_DIR, ignore_errors=True)  # the student is in place and completed
    log.info("%s: %s", m["name"], {b: round(r["rougeL_mean"], 2) for b, r in m["eval"].items()})


def _ensure_held(lock: CellLock | None, doing: str) -> None:
    """LockLost before `doing` unless this run still holds the cell's lock (rank 0 alone; no lock: a caller of
    `setup` without `run_cell`, a benchmark)."""
    if lock is not None:
        lock.ensure_held(doing)


# --------------------------------------------------------------------------------------------- failures
def stopped_at(cell: CellRun) -> dict[str, Any]:
    """This attempt's end step and training seconds so far."""
    return {"end_step": cell.progress.step, "time_s": round(time.time() - cell.progress.t_start, 3)}


@contextmanager
def failures_recorded(*, rank: int, run_dir: Path, metrics: dict[str, Any], tracker: Tracker,
                      where: Callable[[], dict[str, Any]] = dict, lock: CellLock | None = None) -> Iterator[None]:
    """On an error: metrics.json says failed, on a signal or Ctrl-C interrupted (rank 0; never over a completed
    result, never when the lock was lost to another run: LockLost, or `lock` no longer held), the traceback goes
    to the cell's log, the W&B run closes with exit code 1, and the exception propagates."""
    try:
        yield
    except BaseException as exc:
        held = lock is None or lock.holds()
        if rank == 0 and metrics and held and not isinstance(exc, LockLost):
            if isinstance(exc, Exception):
                status, error = "failed", f"{type(exc).__name__}: {exc}"
                cell_log.logger.error("%s", error, exc_info=exc)
            else:
                status = "interrupted"
                error = getattr(exc, "reason", None) or f"{type(exc).__name__} (stopped before it finished)"
                cell_log.logger.warning("interrupted: %s", error)
            end_attempt(metrics, status, error=error, **where())
            write_metrics(run_dir, metrics)
        tracker.finish(1)
        raise
