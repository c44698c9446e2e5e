"""The cell's run: one grid cell (model pair x divergence x tau x data x seed), from its config to metrics.json.

    distill-train divergence=rkl tau=2 model=toy
    distill-train -m divergence=fkl,rkl tau=1,2,4            # a grid
    distill-train -m +sweep=demo hydra/launcher=slurm        # a sweep file on SLURM

`run_cell` reads as calls of public pieces, which benchmarks and other loops (on-policy) call too; each lives
in its own module of distill/train/:

    prepared = prepare(cfg)      # prepare.py: config checks, distributed env, data, tokenizer, vocab check, input
                                 # fingerprints -> identity and run dir (a bad input stops here, nothing on disk)
    lock = lock_cell(...)        # prepare.py: one run per cell: a second run waits, then skips the finished cell
    cell = setup(cfg, prepared, lock)  # prepare.py -> state.CellRun: run dir, tracker, the schedule (global batch split
                                 # over the ranks, epochs -> steps), teacher (frozen) or its cache
                                 # (distill/teachers/source.py), student (DeepSpeed ZeRO) resumed from its latest
                                 # checkpoint (weights-only), the rollout and its state
    train_step(cell, step)       # step.py: one optimizer step: the rollout's micro-batches, the loss of each
                                 # (objective.py), exact accumulation, engine.step
    after_step(cell, result)     # step.py: a lost lock or a non-finite loss stops here first (LockLost,
                                 # TrainingDiverged: nothing of the step written); train log, evaluation +
                                 # checkpoint selection (selection.py), checkpoint on their cadence; a
                                 # SIGTERM/SIGUSR2 stops here: checkpoint (ckpt_every=0 too), `interrupted`,
                                 # requeue (distill/cell/preemption.py)
    finish(cell)                 # finish.py: final validation, HF export of the selected checkpoint, generation +
                                 # ROUGE-L, metrics.json (distill/cell/results.py); a signal before the
                                 # evaluation checkpoints the end of training

Side effects (files, W&B, progress bar) happen on rank 0 only, each after asking the cell's lock whether this
run still holds it (a run that was paused and taken over writes nothing). The cell's own log is
`<cell>/train.log` (distill/tracking/cell_log.py).
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from distill.cell import lock as locks
from distill.cell import preemption as preempt
from distill.cell.results import is_completed, read_metrics
from distill.tracking import cell_log
from distill.train.distributed import on_rank0
from distill.train.finish import failures_recorded, finish, stopped_at
from distill.train.prepare import init_process, lock_cell, prepare, setup
from distill.train.state import Prepared
from distill.train.step import after_step, resume_point, train_step

log = logging.getLogger("distill.train")


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """Train + evaluate one cell; return its metrics dict (also written to `<run_dir>/metrics.json`).

    A completed cell is skipped (force=true reruns it); an unfinished one resumes from its last checkpoint.
    The cell's lock makes one run of it at a time; SIGTERM/SIGUSR2 stop it at a step boundary with a
    checkpoint, status `interrupted` and a requeue where SLURM would not requeue it (preempt.Interrupted).
    """
    rank, world, _ = init_process(cfg)
    with preempt.guard() as signals:
        prepared = prepare(cfg, rank, world)
        lock = lock_cell(cfg, prepared.run_dir, rank, world)
        handler = cell_log.attach(prepared.run_dir) if rank == 0 else None
        interrupted = False
        try:
            done = on_rank0(lambda: _completed_result(cfg, prepared), rank, world)
            if done is not None:
                log.info("skip %s: %s already completed (force=true reruns it)", prepared.name, prepared.run_dir)
                return done
            return _train(cfg, prepared, lock, signals)
        except preempt.Interrupted:
            interrupted = True
            raise
        except Exception as exc:
            if handler is not None:  # errors before setup (the lock, the skip check) end up in the cell log too
                cell_log.logger.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
            raise
        finally:
            signals.in_loop = False
            if lock is not None:
                lock.release()
            if handler is not None:
                cell_log.detach(handler)
            if interrupted and rank == 0:
                # last: the next attempt finds the checkpoint, metrics and a free lock
                signals.requeue(resume_point(prepared.run_dir))


def _completed_result(cfg: DictConfig, prepared: Prepared) -> dict[str, Any] | None:
    """The cell's metrics when it is already completed and force=true does not ask for a rerun (rank 0)."""
    return None if cfg.force or not is_completed(prepared.run_dir) else read_metrics(prepared.run_dir)


def _train(cfg: DictConfig, prepared: Prepared, lock: locks.CellLock | None,
           signals: preempt.Preemption) -> dict[str, Any]:
    """Setup, the loop of steps (signals stop it at a step boundary), finish; a failure is recorded."""
    cell = setup(cfg, prepared, lock)
    with failures_recorded(rank=cell.rank, run_dir=cell.run_dir, metrics=cell.metrics, tracker=cell.tracker,
                           where=lambda: stopped_at(cell), lock=lock):
        signals.in_loop = True  # until finish frees the engine: signals stop at its boundaries, checkpointed
        while cell.progress.step < cell.schedule.max_steps:
            after_step(cell, train_step(cell, cell.progress.step))
        return finish(cell)
