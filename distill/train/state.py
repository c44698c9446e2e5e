"""What the cell's run carries from one stage to the next: `Prepared` (before the lock), `CellRun` (from `setup`
to `finish`) and its `Progress` (where training stands). Plain dataclasses: no behaviour here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distill.cell.lock import CellLock
from distill.config import Schedule
from distill.data.splits import DataSplits
from distill.rollouts.rollout import Rollout
from distill.teachers.cache import TeacherCache
from distill.tracking.wandb_run import Tracker


@dataclass
class Prepared:
    """A cell's inputs and identity, found before its dir exists: a bad input stops here with nothing on disk."""

    splits: DataSplits
    tokenizer: Any
    fingerprints: dict[str, dict[str, Any]]  # role -> {path, size, mtime, sha256} of every input file
    signature: str          # config + input content: the cell's identity (its dir name)
    config_signature: str   # config alone: cells that differ only by their inputs' content share it
    run_dir: Path
    name: str


@dataclass
class Progress:
    """Where training stands: `step` and `tokens` are checkpointed; the rest is this attempt's bookkeeping."""

    step: int = 0              # optimizer steps done
    tokens: int = 0            # global response tokens trained on
    tokens_at_start: int = 0   # `tokens` when this attempt started (resume): throughput counts from here
    t_start: float = 0.0       # wall clock when this attempt's training started
    loss_sum: float = 0.0      # this rank's micro-batch losses since the last train log (checkpointed as a
    loss_steps: int = 0        # global sum, restored on rank 0) and the optimizer steps since that log
    time_before: float = 0.0   # training seconds of earlier attempts (checkpointed)
    evaluations: list[dict] = field(default_factory=list)  # per evaluation: step, valid metrics, selection value
    best: dict | None = None   # the evaluation selected so far (trainer.select); checkpointed with `evaluations`
    ckpt_best_step: int | None = None  # the best step recorded by the latest checkpoint (its export is kept)
    ckpt_step: int | None = None       # the step of the latest checkpoint (None: none yet)


@dataclass
class CellRun:
    """One cell's run between `setup` and `finish`: what `train_step`, `validate` and `finish` work on."""

    cfg: DictConfig
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    schedule: Schedule           # global batch split over the ranks, steps (from epochs), eval/checkpoint cadence
    splits: DataSplits
    tokenizer: Any
    train_examples: list[dict]   # encoded train split; `sample_indices` draws from it
    val_batches: list[dict]      # collated, the same number per rank
    engine: Any                  # the student under DeepSpeed (None once `finish` exported it)
    teacher: torch.nn.Module | None    # frozen, outside DeepSpeed (or partitioned: model.teacher.shard); None for SFT
    cache: TeacherCache | None         # the teacher's outputs on `train_examples` (loss.teacher_cache)
    tracker: Tracker
    metrics: dict[str, Any]      # what metrics.json will hold
    progress: Progress
    rollout: Rollout             # where each step's sequences come from, with its checkpointed state
    bar: Any = None              # tqdm progress bar (rank 0, trainer.progress)
    teacher_engine: Any = None   # the DeepSpeed engine holding a partitioned teacher (model.teacher.shard)
    lock: CellLock | None = None  # the cell's lock (rank 0 of run_cell): asked before every write of the cell
