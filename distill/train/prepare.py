"""Before the first step: the cell's inputs and identity (`prepare`), its lock (`lock_cell`), and everything it
trains with (`setup`). All collective: every rank calls them, rank 0 does the file work.

    prepare(cfg)          config checks, process group, data + tokenizer, vocab check, input fingerprints ->
                          signature and run dir; a bad input stops here with nothing on disk
    lock_cell(...)        one run per cell: wait for a live holder, take over a dead one, or CellBusy
    setup(cfg, prepared)  run dir + config.yaml, metrics.json (running), tracker, encoded examples, teacher (or
                          its cache) and student engine, the schedule, resume from the latest checkpoint,
                          validation batches, the rollout
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as hf_logging

from distill import models
from distill.cell import fingerprints as inputs_mod
from distill.cell import identity as runs
from distill.cell import lock as locks
from distill.cell.results import initial_metrics, read_metrics, write_started
from distill.config import Schedule, check_config
from distill.config import schedule as resolve_schedule
from distill.data import encoding
from distill.data.splits import DataSplits, load_data
from distill.files import atomic_write_text
from distill.options import CellBusy, ConfigError, InputError
from distill.rollouts import rollout as rollout_mod
from distill.rollouts.seq_kd import seq_kd_examples
from distill.secrets import redacted_config
from distill.teachers.cache import TeacherCache
from distill.teachers.source import build_teacher, load_teacher, teacher_cache
from distill.tracking import wandb_run as tracking
from distill.tracking.wandb_run import Tracker, truncate_log
from distill.train import engine as eng
from distill.train.distributed import ensure_lock_held, on_rank0
from distill.train.finish import failures_recorded
from distill.train.selection import validate_model
from distill.train.state import CellRun, Prepared
from distill.train.step import resume

log = logging.getLogger("distill.train")


# --------------------------------------------------------------------------------------------- prepare
def init_process(cfg: DictConfig) -> tuple[int, int, torch.device]:
    """Check the config, then join (or start) the process group: (rank, world size, device). Idempotent."""
    check_config(cfg)
    if cfg.trainer.get("num_threads"):
        torch.set_num_threads(int(cfg.trainer.num_threads))
    # transformers' own bars (loading and writing weights) follow the cell's: a pool's workers share one
    # console, where the bars of cells running side by side would interleave.
    (hf_logging.enable_progress_bar if cfg.trainer.progress else hf_logging.disable_progress_bar)()
    rank, world = eng.setup_distributed(int(cfg.trainer.dist_timeout_s))
    check_config(cfg, world_size=world)
    return rank, world, eng.device_for(int(os.environ.get("LOCAL_RANK", 0)))


def prepare(cfg: DictConfig, rank: int | None = None, world: int | None = None) -> Prepared:
    """Check the config, read the data and tokenizer, check the pair's vocabularies from their configs, and
    fingerprint every input file (rank 0; cached by stat) into the cell's identity and run dir. Collective."""
    if rank is None or world is None:
        rank, world, _ = init_process(cfg)
    splits, tokenizer = load_data_and_tokenizer(cfg)  # first: a bad data file stops before anything is written
    fps = on_rank0(lambda: inputs_mod.fingerprints(cfg, inputs_mod.embedded_dir(cfg)), rank, world)
    try:
        models.check_vocab_configs(cfg.model, tokenizer, distill=float(cfg.loss.kd_ratio) > 0)
    except (OSError, ValueError) as exc:
        raise InputError(f"model={cfg.model.name}: {str(exc).splitlines()[0]}") from exc
    prepared = Prepared(splits=splits, tokenizer=tokenizer, fingerprints=fps, signature=runs.signature(cfg, inputs=fps),
                        config_signature=runs.signature(cfg), run_dir=runs.run_dir(cfg, inputs=fps),
                        name=runs.cell_name(cfg))
    if (cfg.get("inputs") or {}).get("on_change", "rerun") == "error":
        on_rank0(lambda: _check_inputs_unchanged(prepared), rank, world)
    return prepared


def load_data_and_tokenizer(cfg: DictConfig) -> tuple[DataSplits, Any]:
    """The data splits and the tokenizer (the embedded suite brings its own); a bad file is one InputError line.
    A tokenizer named by `model.tokenizer` is loaded first, so the splits can count (or drop,
    `data.long_prompts=drop`) its over-long prompts."""
    def load_tok(tok_path):
        try:
            return models.load_tokenizer(tok_path, bool(cfg.model.get("trust_remote_code", False)))
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"tokenizer {tok_path}: cannot be loaded ({first}): set model.tokenizer to the pair's "
                             "tokenizer dir or hub id") from exc

    tokenizer = load_tok(cfg.model.tokenizer) if cfg.model.get("tokenizer") else None
    try:
        splits = load_data(cfg.data, Path(cfg.paths.data_dir), tokenizer=tokenizer)
    except (ValueError, OSError) as exc:  # missing/empty/malformed/non-UTF-8 files: the message names file:line
        raise InputError(f"data={cfg.data.name}: {exc}") from exc
    if tokenizer is None:
        if splits.tokenizer_dir is None:
            raise ConfigError(f"model.tokenizer is not set and data={cfg.data.name} brings no tokenizer")
        tokenizer = load_tok(splits.tokenizer_dir)
    return splits, tokenizer


def _check_inputs_unchanged(prepared: Prepared) -> None:
    """inputs.on_change=error: stop if a cell of the same config ran on other input content."""
    for other in sorted(prepared.run_dir.parent.glob(f"{prepared.name}-*")):
        m = read_metrics(other) or {}
        if other != prepared.run_dir and m.get("config_signature") == prepared.config_signature and m.get("inputs"):
            changed = inputs_mod.changes(m["inputs"], prepared.fingerprints)
            if changed:
                raise InputError(f"inputs changed since {other.name} ran: {'; '.join(changed)}. "
                                 "Set inputs.on_change=rerun to train this cell on the new inputs")


# --------------------------------------------------------------------------------------------- the lock
def _make_dir(path: Path, what: str = "the cell dir") -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write {what} {path} ({exc.strerror or exc}): point paths.root (or DISTILL_OUTPUT) "
                         "at a writable directory") from exc


def lock_cell(cfg: DictConfig, run_dir: Path, rank: int, world: int) -> locks.CellLock | None:
    """Take the cell's lock (rank 0 holds it; every rank follows): wait `cell_lock.wait_s` for a live holder
    (null: as long as it lives), take over a dead one, or raise CellBusy naming the holder. Collective."""
    lcfg = cfg.get("cell_lock") or {}
    wait_s = lcfg.get("wait_s")
    lock = locks.CellLock(run_dir, float(lcfg.get("heartbeat_s", 30)), float(lcfg.get("stale_after_s", 300))) \
        if rank == 0 else None
    on_rank0(lambda: _make_dir(run_dir), rank, world)
    deadline = None if wait_s is None else time.monotonic() + float(wait_s)
    poll = min(10.0, float(lcfg.get("heartbeat_s", 30)))

    def attempt() -> tuple[locks.Holder, bool] | None:
        try:
            holder = lock.try_acquire()
        except OSError as exc:
            raise InputError(f"cannot write the cell lock in {run_dir} ({exc.strerror or exc}): point paths.root "
                             "(or DISTILL_OUTPUT) at a writable directory") from exc
        return None if holder is None else (holder, deadline is not None and time.monotonic() >= deadline)

    announced = False
    while True:
        busy = on_rank0(attempt, rank, world)
        if busy is None:
            if rank == 0 and lock.took_over:
                log.warning("%s: took the cell over from %s", run_dir.name, lock.took_over)
            return lock
        holder, give_up = busy
        if give_up:
            raise CellBusy(f"{run_dir} is being run by {holder.describe()}: not started twice (that run finishes "
                           "the cell; rerun later to skip it, or set cell_lock.wait_s=null to wait for it)")
        if not announced:
            log.warning("%s is being run by %s: waiting for it", run_dir.name, holder.describe())
            announced = True
        time.sleep(poll if deadline is None else max(0.05, min(poll, deadline - time.monotonic())))


# --------------------------------------------------------------------------------------------- setup
def setup(cfg: DictConfig, prepared: Prepared | None = None, lock: locks.CellLock | None = None) -> CellRun:
    """Everything a cell trains with: run dir, tracker, data, tokenizer, teacher (or its cache), the student
    under DeepSpeed resumed from its latest checkpoint, validation batches.

    Collective (every rank calls it). A failure here is recorded like one in training: metrics.json says
    "failed" (rank 0) and the W&B run closes with exit code 1. `run_cell` calls it holding the cell lock
    (`lock`, rank 0: the cell's writes from here on ask it first); benchmarks may call it alone.
    """
    rank, world, device = init_process(cfg)
    prepared = prepared or prepare(cfg, rank, world)
    rdir = _open_run_dir(cfg, prepared.run_dir, rank)
    metrics = on_rank0(lambda: initial_metrics(cfg, name=prepared.name, signature=prepared.signature,
                                               config_signature=prepared.config_signature, run_dir=prepared.run_dir,
                                               inputs=prepared.fingerprints), rank, world)
    tracker = _tracker(cfg, metrics, rdir, rank)
    with failures_recorded(rank=rank, run_dir=rdir, metrics=metrics, tracker=tracker, lock=lock):
        if rank == 0:
            write_started(rdir, metrics)
        return _build_cell(cfg, prepared, rdir, metrics, tracker, rank=rank, world=world, device=device, lock=lock)


def _open_run_dir(cfg: DictConfig, rdir: Path, rank: int) -> Path:
    """The cell's run dir with its config.yaml (rank 0; force=true drops old checkpoints), all ranks synced."""
    if rank == 0:
        if cfg.force:
            shutil.rmtree(rdir / eng.CKPT_DIR, ignore_errors=True)
            (rdir / tracking.LOG_FILE).unlink(missing_ok=True)   # the log of the result being replaced
        _make_dir(rdir)
        atomic_write_text(rdir / "config.yaml", OmegaConf.to_yaml(redacted_config(cfg)))
    dist.barrier()
    return rdir


def _tracker(cfg: DictConfig, metrics: dict[str, Any], rdir: Path, rank: int) -> Tracker:
    """The cell's W&B run and JSONL log (rank 0): one run per cell, resumed by every attempt."""
    run_id = tracking.run_id(cfg.sweep_name, metrics["name"], metrics["signature"])
    if cfg.force:  # a forced rerun replaces the cell's result: a new W&B run, not more steps of the old one
        run_id += time.strftime("-force%Y%m%d%H%M%S")
    return Tracker(
        cfg.logger, run_id=run_id, name=metrics["name"], group=cfg.sweep_name,
        job_type=tracking.job_type(cfg.loss.kd_ratio, cfg.logger.get("job_type")),
        tags=[f"div:{metrics['cell']['divergence']}", f"tau:{cfg.tau:g}", f"model:{cfg.model.name}",
              f"rollout:{(cfg.get('rollout') or {}).get('name', 'offline')}"],
        config=OmegaConf.to_container(cfg, resolve=True), run_dir=rdir, enabled=rank == 0,
    )


def _build_cell(cfg: DictConfig, prepared: Prepared, rdir: Path, metrics: dict[str, Any], tracker: Tracker, *,
                rank: int, world: int, device: torch.device, lock: locks.CellLock | None) -> CellRun:
    """Encode the data, build the models, resume, and gather what the loop needs into a CellRun."""
    splits, tokenizer = prepared.splits, prepared.tokenizer
    trunc = encoding.TruncationStats()
    train_ex = encoding.encode_records(tokenizer, splits.train, cfg.data, trunc)
    val_ex = encoding.encode_records(tokenizer, splits.valid, cfg.data, trunc)
    if trunc.prompts_truncated or trunc.responses_truncated:
        log.warning("truncation (max_prompt_length=%d, max_length=%d): %s", int(cfg.data.max_prompt_length),
                    int(cfg.data.max_length), trunc.as_dict())
    teacher, teacher_engine, cache, engine, train_ex, sched = _build_models(
        cfg, tokenizer, train_ex, device=device, rank=rank, world=world)
    progress = resume(engine, rdir, rank)
    if rank == 0:
        truncate_log(tracker.log_path, progress.step)  # a redone step is logged once
        metrics["attempts"][-1]["start_step"] = progress.step
    metrics["train"] = {"resumed_from_step": progress.step, "truncation": trunc.as_dict(), **_batch_info(sched)}
    val_batches = validation_batches(val_ex, cfg.trainer, tokenizer.pad_token_id, world, micro=sched.batch.micro)
    rollout = _rollout(cfg, tokenizer, rdir, progress.step, sched, world=world, rank=rank)
    if rollout.needs_initial_dev_loss and val_batches:
        # DistiLLM's SGO compares later dev losses with the one before training (finetune.py: the first
        # `evaluate` call before the loop).
        val = validate_model(engine.module, teacher, val_batches, device, rank, world)
        rollout.observe_dev_loss(val["ce"])
        ensure_lock_held(lock, rdir, device, "logging the dev loss before training")
        tracker.log({f"valid/{k}": v for k, v in val.items()}, step=0)
    bar = _progress_bar(sched, progress.step, metrics["name"]) if rank == 0 and cfg.trainer.progress else None
    progress.t_start = time.time()
    engine.train()
    return CellRun(cfg=cfg, rank=rank, world=world, device=device, run_dir=rdir, schedule=sched, splits=splits,
                   tokenizer=tokenizer, train_examples=train_ex, val_batches=val_batches, engine=engine,
                   teacher=teacher, cache=cache, tracker=tracker, metrics=metrics, progress=progress,
                   rollout=rollout, bar=bar, teacher_engine=teacher_engine, lock=lock)


def _progress_bar(sched: Schedule, step: int, name: str) -> Any:
    """The cell's tqdm bar (rank 0, trainer.progress), starting at the resumed step."""
    from tqdm.auto import tqdm  # heavy third-party import (tqdm.auto probes for notebooks), only when shown

    return tqdm(total=sched.max_steps, initial=step, desc=name, unit="step", dynamic_ncols=True)


def _batch_info(sched: Schedule) -> dict[str, Any]:
    """How this cell ran its global batch (metrics.json `train`): the same global batch on any world size."""
    b = sched.batch
    return {"global_batch_size": b.global_batch, "micro_batch_size": b.micro, "grad_accum": b.accum,
            "world_size": b.world, "steps_per_epoch": sched.steps_per_epoch, "epochs": round(sched.epochs, 4)}


def _build_models(cfg: DictConfig, tokenizer: Any, train_ex: list[dict], *, device: torch.device, rank: int,
                  world: int) -> tuple[torch.nn.Module | None, Any, TeacherCache | None, Any, list[dict], Schedule]:
    """(teacher, its DeepSpeed engine when partitioned, teacher cache, student engine, training examples, schedule:
    the global batch split over `world` ranks, epochs -> steps, counting the final training examples).

    The teacher is frozen and in eval mode (distill.teachers.source); there is none at all for SFT
    (kd_ratio=0). With rollout=seq_kd the training examples are the teacher's cached samples (and the teacher
    cache, if any, is computed on those).
    """
    tcfg = cfg.trainer
    dtype = models.torch_dtype(tcfg.precision if cfg.model.dtype == "auto" else cfg.model.dtype)
    student = _build_student(cfg, tokenizer, dtype)
    teacher = teacher_engine = cache = None
    if cfg.loss.kd_ratio > 0:
        teacher, teacher_engine = build_teacher(cfg, tokenizer, dtype, device)
        models.check_vocab(student, teacher, tokenizer)
    if (cfg.get("rollout") or {}).get("name") == "seq_kd":
        train_ex = seq_kd_examples(
            Path(cfg.paths.cache_dir), cfg.model.teacher.path, train_ex, cfg.rollout,
            load_teacher=lambda: teacher if teacher is not None else load_teacher(cfg, tokenizer, dtype, device),
            pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_length=int(cfg.data.max_length),
            progress=rank == 0 and bool(tcfg.progress),
        )
    sched = resolve_schedule(tcfg, world, len(train_ex))
    if teacher is not None:
        cache = teacher_cache(cfg, teacher, train_ex, pad_id=tokenizer.pad_token_id, dtype=dtype, device=device,
                              rank=rank)
    engine = eng.initialize(student, tcfg, world, max_steps=sched.max_steps, plan=sched.batch)
    return teacher, teacher_engine, cache, engine, train_ex, sched


def _build_student(cfg: DictConfig, tokenizer: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The student before DeepSpeed: built or loaded, gradient checkpointing, a head the fused loss can use."""
    student = models.build_model(cfg.model, "student", tokenizer, dtype, int(cfg.data.max_length), seed=int(cfg.seed))
    if cfg.trainer.get("gradient_checkpointing"):
        student.gradient_checkpointing_enable()
    if cfg.loss.impl == "fused":
        models.check_output_head(student, models.output_head(student), "student")
    return student


def _rollout(cfg: DictConfig, tokenizer: Any, rdir: Path, step: int, sched: Schedule, *, world: int,
             rank: int) -> rollout_mod.Rollout:
    """The cell's rollout; when resuming, with the replay buffer, threshold and counters of the checkpoint."""
    rollout = rollout_mod.Rollout(
        cfg.get("rollout") or {"name": "offline"}, seed=int(cfg.seed), max_steps=sched.max_steps,
        pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_length=int(cfg.data.max_length),
        # ZeRO-3 gathers parameters inside every forward: ranks must keep stepping until all finished generating
        synced_gpus=int(cfg.trainer.zero_stage) == 3 and world > 1,
    )
    if step > 0 and rollout.stateful:
        rollout.load(eng.checkpoint_dir(rdir, step), rank)
    return rollout


def validation_batches(val_ex: list[dict], tcfg: DictConfig, pad_id: int, world: int,
                       micro: int | None = None) -> list[dict]:
    """`trainer.val_batches` micro-batches per rank (null: the whole split) from the head of the valid split,
    equal forwards per rank."""
    mbs = int(micro or tcfg.micro_batch_size)
    n_val = int(tcfg.val_batches) * world if tcfg.get("val_batches") is not None else math.ceil(len(val_ex) / mbs)
    batches = [encoding.collate_train(val_ex[i * mbs:(i + 1) * mbs], pad_id) for i in range(n_val)
               if val_ex[i * mbs:(i + 1) * mbs]]
    return batches[: (len(batches) // world) * world]
