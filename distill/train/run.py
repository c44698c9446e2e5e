"""`distill-train`: one grid cell (model pair x divergence x tau x data x seed), as a recipe.

    distill-train divergence=rkl tau=2 model=toy
    distill-train -m divergence=fkl,rkl tau=1,2,4            # a grid
    distill-train -m +sweep=demo hydra/launcher=slurm        # a sweep file on SLURM

`run_cell` reads as the recipe's public pieces, which benchmarks and other loops (on-policy) call too:

    prepared = prepare(cfg)      # config checks, distributed env, data, tokenizer, vocab check, input
                                 # fingerprints -> identity and run dir (a bad input stops here, nothing on disk)
    (cell lock)                  # one run per cell: a second run waits, then skips the finished cell
    cell = setup(cfg, prepared)  # run dir, tracker, the schedule (global batch split over the ranks, epochs ->
                                 # steps), teacher (frozen) or its cache, student (DeepSpeed ZeRO) resumed from its
                                 # latest checkpoint (weights-only), the rollout and its state
    train_step(cell, step)       # one optimizer step: the rollout's micro-batches, exact accumulation, engine.step
    after_step(cell, result)     # train log, validate(cell) + checkpoint selection, checkpoint on their cadence;
                                 # a SIGTERM/SIGUSR2 stops here: checkpoint, `interrupted`, requeue (distill.preempt)
    finish(cell)                 # final validation, HF export of the selected checkpoint, generation + ROUGE-L,
                                 # metrics.json

Side effects (files, W&B, progress bar) happen on rank 0 only. The cell's own log is `<cell>/train.log`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as hf_logging

from distill.data import records as data_mod
from distill.train import engine as eng
from distill import models
from distill.evaluation import generate as evaluate
from distill.cell import lock as locks
from distill.cell import preemption as preempt
from distill.cell import identity as runs
from distill.cell.results import (METRICS_FILE, SCHEMA_VERSION, is_completed, now_iso, read_generations, read_metrics,
                                  write_metrics)
from distill.files import atomic_write_json, atomic_write_text
from distill.secrets import redact
from distill.cell import fingerprints as inputs_mod
from distill.rollouts import rollout as rollout_mod
from distill.rollouts.seq_kd import seq_kd_examples
from distill.losses.chunked import fused_distillation_loss, loss_fn_for
from distill.config import Schedule, check_config
from distill.options import CellBusy, ConfigError, InputError, LockLost
from distill.config import schedule as resolve_schedule
from distill.data.records import response_mask
from distill.data.splits import DataSplits, load_data
from distill.teachers.cache import TeacherCache, resolve_kind
from distill.tracking import wandb_run as tracking
from distill.tracking.wandb_run import Tracker, truncate_log

log = logging.getLogger("distill.train")
# The cell's own log (<cell>/train.log): periodic loss lines and tracebacks, kept off the console.
cell_log = logging.getLogger("distill.cell_log")
cell_log.propagate = False
CELL_LOG_FILE = "train.log"


# --------------------------------------------------------------------------------------------- data
def sample_indices(n: int, step: int, micro: int, rank: int, *, world: int, micro_bs: int, grad_accum: int,
                   seed: int, _perms: dict[int, torch.Tensor] = {}) -> list[int]:  # noqa: B006 (memo)
    """Indices of the examples in (step, micro-batch, rank): a pure function of its arguments.

    Each epoch is a fresh permutation, seeded by (seed, epoch), cut into `n // global batch` steps (the
    last partial batch is dropped, as the anchors' samplers do); step k takes positions
    [k' x G, (k' + 1) x G) of its epoch's permutation (k' = k mod steps per epoch), split over micro-batches
    and ranks. So the examples of a step depend on the global batch G only, not on how it is split, and
    resuming at step k sees exactly the batches an uninterrupted run would, with no sampler state to
    checkpoint. A training set smaller than one global batch is cycled through continuously.
    """
    global_bs = micro_bs * grad_accum * world
    offset = (micro * world + rank) * micro_bs
    per_epoch = n // global_bs
    out = []
    for i in range(offset, offset + micro_bs):
        if per_epoch:
            epoch, pos = step // per_epoch, (step % per_epoch) * global_bs + i
        else:
            epoch, pos = divmod(step * global_bs + i, n)
        # One permutation per (seed, n, epoch), memoised in a default argument for the life of the process.
        key = (seed, n, epoch)
        if key not in _perms:
            _perms[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(_perms[key][pos]))
    return out


# --------------------------------------------------------------------------------------------- loss
def _kd_kwargs(cfg: DictConfig, num_tokens: float) -> dict[str, Any]:
    params = {k: v for k, v in cfg.divergence.items() if k != "name"}
    return dict(divergence=cfg.divergence.name, tau=float(cfg.tau), tau_target=cfg.loss.tau_target,
                tau_squared=bool(cfg.loss.tau_squared), num_tokens=num_tokens, **params)


def batch_loss(cfg: DictConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
               labels: torch.Tensor, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
    """kd_ratio x distillation + (1 - kd_ratio) x CE, each a masked sum over `num_tokens` global tokens."""
    mask = response_mask(labels)
    s = student_logits[:, :-1]
    kd_ratio = float(cfg.loss.kd_ratio)
    # CE on the response rows only; at kd_ratio=1 it is only logged, so it gets no graph either.
    with torch.set_grad_enabled(kd_ratio < 1.0 and torch.is_grad_enabled()):
        ce = F.cross_entropy(s[mask].float(), labels[:, 1:][mask], reduction="sum") / num_tokens
    if kd_ratio == 0.0:
        return ce, {"ce": ce.item()}
    kd_fn = loss_fn_for(cfg.loss.impl, chunk_size=int(cfg.loss.chunk_size))
    kd = kd_fn(s, teacher_logits[:, :-1], mask, **_kd_kwargs(cfg, num_tokens))
    return kd_ratio * kd + (1.0 - kd_ratio) * ce, {"ce": ce.item(), "kd": kd.item()}


def fused_batch_loss(cfg: DictConfig, engine, teacher, batch: dict, num_tokens: float,
                     teacher_hidden: torch.Tensor | None = None):
    """The distillation loss from final hidden states and output heads: full logits never exist.

    `teacher_hidden` comes from the hidden-state cache; without it the live teacher runs. Each head brings its
    bias and logit scaling / softcapping. Under ZeRO-3 the loss runs as the student head's forward, so DeepSpeed
    gathers the head's weight for it and for its backward and reduces its gradient into the partitions; a
    teacher partitioned across ranks (model.teacher.shard) has its head gathered for the call.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student = engine.module
    s_hidden = models.final_hidden(student, **inputs, forward=engine)
    if teacher_hidden is None:
        with torch.no_grad():
            teacher_hidden = models.final_hidden(teacher, **inputs)
    s_head, t_head = models.output_head(student), models.output_head(teacher)
    mask = response_mask(batch["labels"])

    def loss(hidden: torch.Tensor) -> torch.Tensor:
        with models.gathered([t_head.weight, t_head.bias]):
            return fused_distillation_loss(
                hidden[:, :-1], s_head.weight, teacher_hidden[:, :-1], t_head.weight, mask,
                chunk_size=int(cfg.loss.chunk_size), **s_head.loss_kwargs("student"),
                **t_head.loss_kwargs("teacher"), **_kd_kwargs(cfg, num_tokens),
            )

    kd = eng.call_as_forward(s_head.module, loss, s_hidden)
    return kd, {"kd": kd.item()}


# --------------------------------------------------------------------------------------------- helpers
def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def validate_model(student, teacher, val_batches: list[dict], device, rank: int, world: int) -> dict[str, float]:
    """Teacher-forced CE (and FKL/RKL at tau=1 when a teacher exists), exact over all ranks' shards.

    Every rank runs the same number of forwards (ZeRO-3 forwards are collective).
    """
    shard = [{k: v.to(device) for k, v in b.items()} for b in val_batches[rank::world]]
    m = evaluate.teacher_forced_metrics(student, shard, teacher=teacher, allow_empty=True)
    keys = [k for k in ("ce", "fkl", "rkl") if k in m]
    sums = _all_reduce_sum([m[k] * m["tokens"] for k in keys] + [m["tokens"]], device)
    total = max(sums[-1], 1.0)
    return {k: s / total for k, s in zip(keys, sums[:-1])}


# --------------------------------------------------------------------------------------------- the cell
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


@dataclass
class Cell:
    """One cell's job between `setup` and `finish`: what `train_step`, `validate` and `finish` work on."""

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
    rollout: rollout_mod.Rollout  # where each step's sequences come from, with its checkpointed state
    bar: Any = None              # tqdm progress bar (rank 0, trainer.progress)
    teacher_engine: Any = None   # the DeepSpeed engine holding a partitioned teacher (model.teacher.shard)


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


def _on_rank0(fn: Callable[[], Any], rank: int, world: int) -> Any:
    """Run `fn` on rank 0 and hand its result, or its exception, to every rank."""
    box: list[Any] = [None]
    if rank == 0:
        try:
            box = [("ok", fn())]
        except Exception as exc:  # every rank raises it, so none waits in a collective for ever
            box = [("error", exc)]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def prepare(cfg: DictConfig, rank: int | None = None, world: int | None = None) -> Prepared:
    """Check the config, read the data and tokenizer, check the pair's vocabularies from their configs, and
    fingerprint every input file (rank 0; cached by stat) into the cell's identity and run dir. Collective."""
    if rank is None or world is None:
        rank, world, _ = init_process(cfg)
    splits, tokenizer = load_data_and_tokenizer(cfg)  # first: a bad data file stops before anything is written
    fps = _on_rank0(lambda: inputs_mod.fingerprints(cfg, inputs_mod.embedded_dir(cfg)), rank, world)
    try:
        models.check_vocab_configs(cfg.model, tokenizer, distill=float(cfg.loss.kd_ratio) > 0)
    except (OSError, ValueError) as exc:
        raise InputError(f"model={cfg.model.name}: {str(exc).splitlines()[0]}") from exc
    prepared = Prepared(splits=splits, tokenizer=tokenizer, fingerprints=fps, signature=runs.signature(cfg, inputs=fps),
                        config_signature=runs.signature(cfg), run_dir=runs.run_dir(cfg, inputs=fps),
                        name=runs.cell_name(cfg))
    if (cfg.get("inputs") or {}).get("on_change", "rerun") == "error":
        _on_rank0(lambda: _check_inputs_unchanged(prepared), rank, world)
    return prepared


def _check_inputs_unchanged(prepared: Prepared) -> None:
    """inputs.on_change=error: stop if a cell of the same config ran on other input content."""
    for other in sorted(prepared.run_dir.parent.glob(f"{prepared.name}-*")):
        m = read_metrics(other) or {}
        if other != prepared.run_dir and m.get("config_signature") == prepared.config_signature and m.get("inputs"):
            changed = inputs_mod.changes(m["inputs"], prepared.fingerprints)
            if changed:
                raise InputError(f"inputs changed since {other.name} ran: {'; '.join(changed)}. "
                                 "Set inputs.on_change=rerun to train this cell on the new inputs")


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
    _on_rank0(lambda: _make_dir(run_dir), rank, world)
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
        busy = _on_rank0(attempt, rank, world)
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


def setup(cfg: DictConfig, prepared: Prepared | None = None) -> Cell:
    """Everything a cell trains with: run dir, tracker, data, tokenizer, teacher (or its cache), the student
    under DeepSpeed resumed from its latest checkpoint, validation batches.

    Collective (every rank calls it). A failure here is recorded like one in training: metrics.json says
    "failed" (rank 0) and the W&B run closes with exit code 1. `run_cell` calls it holding the cell lock;
    benchmarks may call it alone.
    """
    rank, world, device = init_process(cfg)
    prepared = prepared or prepare(cfg, rank, world)
    rdir = _open_run_dir(cfg, prepared.run_dir, rank)
    metrics = _initial_metrics(cfg, prepared) if rank == 0 else {}
    metrics = _on_rank0(lambda: metrics, rank, world)  # the same identity on every rank
    run_id = tracking.run_id(cfg.sweep_name, metrics["name"], metrics["signature"])
    if cfg.force:  # a forced rerun replaces the cell's result: a new W&B run, not more steps of the old one
        run_id += time.strftime("-force%Y%m%d%H%M%S")
    tracker = Tracker(
        cfg.logger, run_id=run_id, name=metrics["name"], group=cfg.sweep_name,
        job_type=tracking.job_type(cfg.loss.kd_ratio, cfg.logger.get("job_type")),
        tags=[f"div:{metrics['cell']['divergence']}", f"tau:{cfg.tau:g}", f"model:{cfg.model.name}",
              f"rollout:{(cfg.get('rollout') or {}).get('name', 'offline')}"],
        config=OmegaConf.to_container(cfg, resolve=True), run_dir=rdir, enabled=rank == 0,
    )
    with _failures_recorded(rank=rank, run_dir=rdir, metrics=metrics, tracker=tracker):
        if rank == 0:
            atomic_write_json(rdir / METRICS_FILE, {**metrics, "updated_at": now_iso()})
        splits, tokenizer = prepared.splits, prepared.tokenizer
        trunc = data_mod.TruncationStats()
        train_ex = data_mod.encode_records(tokenizer, splits.train, cfg.data, trunc)
        val_ex = data_mod.encode_records(tokenizer, splits.valid, cfg.data, trunc)
        if trunc.prompts_truncated or trunc.responses_truncated:
            log.warning("truncation (max_prompt_length=%d, max_length=%d): %s", int(cfg.data.max_prompt_length),
                        int(cfg.data.max_length), trunc.as_dict())
        teacher, teacher_engine, cache, engine, train_ex, sched = _build_models(
            cfg, tokenizer, train_ex, device=device, rank=rank, world=world)
        progress = _resume(engine, rdir, rank)
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
            tracker.log({f"valid/{k}": v for k, v in val.items()}, step=0)
        bar = None
        if rank == 0 and cfg.trainer.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sched.max_steps, initial=progress.step, desc=metrics["name"], unit="step",
                       dynamic_ncols=True)
        progress.t_start = time.time()
        engine.train()
    return Cell(cfg=cfg, rank=rank, world=world, device=device, run_dir=rdir, schedule=sched, splits=splits,
                tokenizer=tokenizer,
                train_examples=train_ex, val_batches=val_batches, engine=engine, teacher=teacher, cache=cache,
                tracker=tracker, metrics=metrics, progress=progress, rollout=rollout, bar=bar,
                teacher_engine=teacher_engine)


def _open_run_dir(cfg: DictConfig, rdir: Path, rank: int) -> Path:
    """The cell's run dir with its config.yaml (rank 0; force=true drops old checkpoints), all ranks synced."""
    if rank == 0:
        if cfg.force:
            shutil.rmtree(rdir / eng.CKPT_DIR, ignore_errors=True)
            (rdir / tracking.LOG_FILE).unlink(missing_ok=True)   # the log of the result being replaced
        _make_dir(rdir)
        atomic_write_text(rdir / "config.yaml", OmegaConf.to_yaml(redact(OmegaConf.to_container(cfg, resolve=True))))
    dist.barrier()
    return rdir


def host_info() -> dict[str, Any]:
    """Where this attempt runs: host, pid and the SLURM job/array ids that are set."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm": locks.slurm_ids()}


def _initial_metrics(cfg: DictConfig, prepared: Prepared) -> dict[str, Any]:
    """metrics.json at the start of an attempt: identity, inputs, host, and the attempts so far plus this one."""
    previous = None if cfg.force else read_metrics(prepared.run_dir)
    attempts = [a for a in (previous or {}).get("attempts") or [] if isinstance(a, dict)]
    for a in attempts:
        if a.get("status") == "running":  # its process died without a word (SIGKILL, node failure)
            a.update(status="stale", note="ended without recording it (killed)")
    attempts.append({"attempt": len(attempts) + 1, **host_info(), "started_at": now_iso(), "start_step": 0,
                     "status": "running"})
    sig = prepared.signature
    return {
        "schema_version": SCHEMA_VERSION, "status": "running", "signature": sig,
        "config_signature": prepared.config_signature, "name": prepared.name, "sweep": cfg.sweep_name,
        "cell": runs.cell_identity(cfg, sig), "run_dir": str(prepared.run_dir), "inputs": prepared.fingerprints,
        **host_info(), "attempts": attempts,
    }


def _end_attempt(metrics: dict[str, Any], status: str, **where: Any) -> None:
    """Close this attempt's record in metrics: status, end time, and `where` it stood (end_step, time_s)."""
    if metrics.get("attempts"):
        metrics["attempts"][-1].update(status=status, ended_at=now_iso(),
                                       **{k: v for k, v in where.items() if v is not None})


def _where(cell: Cell) -> dict[str, Any]:
    """This attempt's end step and training seconds so far."""
    return {"end_step": cell.progress.step, "time_s": round(time.time() - cell.progress.t_start, 3)}


@contextmanager
def _failures_recorded(*, rank: int, run_dir: Path, metrics: dict[str, Any], tracker: Tracker,
                       where: Callable[[], dict[str, Any]] = dict) -> Iterator[None]:
    """On an error: metrics.json says failed, on a signal or Ctrl-C interrupted (rank 0; never over a completed
    result, never when the lock was lost to another run), the traceback goes to the cell's log, the W&B run
    closes with exit code 1, and the exception propagates."""
    try:
        yield
    except BaseException as exc:
        if rank == 0 and metrics and not isinstance(exc, LockLost):
            if isinstance(exc, Exception):
                status, error = "failed", f"{type(exc).__name__}: {exc}"
                cell_log.error("%s", error, exc_info=exc)
            else:
                status = "interrupted"
                error = getattr(exc, "reason", None) or f"{type(exc).__name__} (stopped before it finished)"
                cell_log.warning("interrupted: %s", error)
            _end_attempt(metrics, status, **where())
            metrics.update(status=status, error=error, updated_at=now_iso())
            write_metrics(run_dir, metrics)
        tracker.finish(1)
        raise


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


def _batch_info(sched: Schedule) -> dict[str, Any]:
    """How this cell ran its global batch (metrics.json `train`): the same global batch on any world size."""
    b = sched.batch
    return {"global_batch_size": b.global_batch, "micro_batch_size": b.micro, "grad_accum": b.accum,
            "world_size": b.world, "steps_per_epoch": sched.steps_per_epoch, "epochs": round(sched.epochs, 4)}


def _build_models(cfg: DictConfig, tokenizer, train_ex: list[dict], *, device: torch.device, rank: int,
                  world: int) -> tuple[torch.nn.Module | None, Any, TeacherCache | None, Any, list[dict], Schedule]:
    """(teacher, its DeepSpeed engine when partitioned, teacher cache, student engine, training examples, schedule:
    the global batch split over `world` ranks, epochs -> steps, counting the final training examples).

    The teacher is frozen and in eval mode: a full copy per rank outside DeepSpeed, or, with
    model.teacher.shard, partitioned across ranks by ZeRO-3 inference (loaded under zero.Init from a path, so no
    rank ever holds all of it). There is none at all for SFT (kd_ratio=0). With rollout=seq_kd the training
    examples are the teacher's cached samples (and the teacher cache, if any, is computed on those).
    """
    tcfg, max_len = cfg.trainer, int(cfg.data.max_length)
    dtype = models.torch_dtype(tcfg.precision if cfg.model.dtype == "auto" else cfg.model.dtype)
    student = models.build_model(cfg.model, "student", tokenizer, dtype, max_len, seed=int(cfg.seed))
    if tcfg.get("gradient_checkpointing"):
        student.gradient_checkpointing_enable()
    if cfg.loss.impl == "fused":
        models.check_output_head(student, models.output_head(student), "student")
    teacher = teacher_engine = cache = None
    if cfg.loss.kd_ratio > 0:
        teacher, teacher_engine = _build_teacher(cfg, tokenizer, dtype, device)
        models.check_vocab(student, teacher, tokenizer)
    if (cfg.get("rollout") or {}).get("name") == "seq_kd":
        def load_teacher() -> torch.nn.Module:
            model = models.build_model(cfg.model, "teacher", tokenizer, dtype, max_len, seed=int(cfg.seed) + 1)
            return model.requires_grad_(False).eval().to(device)

        train_ex = seq_kd_examples(
            Path(cfg.paths.cache_dir), cfg.model.teacher.path, train_ex, cfg.rollout,
            load_teacher=lambda: teacher if teacher is not None else load_teacher(), pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id, max_length=max_len, progress=rank == 0 and bool(tcfg.progress),
        )
    sched = resolve_schedule(tcfg, world, len(train_ex))
    if teacher is not None:
        cache = _teacher_cache(cfg, teacher, train_ex, pad_id=tokenizer.pad_token_id, dtype=dtype, device=device,
                               rank=rank)
    engine = eng.initialize(student, tcfg, world, max_steps=sched.max_steps, plan=sched.batch)
    return teacher, teacher_engine, cache, engine, train_ex, sched


def _teacher_cache(cfg: DictConfig, teacher, train_ex: list[dict], *, pad_id: int, dtype: torch.dtype,
                   device: torch.device, rank: int) -> TeacherCache | None:
    """The teacher's outputs on `train_ex` in the form loss.teacher_cache asks for (None: the live teacher)."""
    t_head = models.output_head(teacher)
    vocab, hidden = (int(x) for x in models.param_shape(t_head.weight))
    setting = cfg.loss.teacher_cache
    if setting == "auto" and not cfg.model.teacher.get("path"):
        setting = False  # the cache is keyed by the teacher's files: a teacher built from sizes runs live
    kind = resolve_kind(setting, hidden_size=hidden, vocab_size=vocab, dtype=dtype,
                        topk=cfg.loss.get("teacher_cache_topk"))
    if kind == "logits" and cfg.loss.impl == "fused" and cfg.loss.teacher_cache in (True, "auto"):
        kind = "hidden"  # the fused loss reads hidden states, whichever form would be smaller
    if cfg.loss.impl == "fused" or kind == "hidden":
        models.check_output_head(teacher, t_head, "teacher")  # its head will make the logits
    if kind is None:
        return None
    return TeacherCache.build_or_load(
        Path(cfg.paths.cache_dir), teacher, cfg.model.teacher.path, train_ex, pad_id=pad_id,
        batch_size=int(cfg.trainer.micro_batch_size), kind=kind, topk=cfg.loss.get("teacher_cache_topk"),
        device=device, dtype=dtype, progress=rank == 0 and bool(cfg.trainer.progress),
    )


def _build_teacher(cfg: DictConfig, tokenizer, dtype: torch.dtype, device: torch.device):
    """(teacher, None), or with model.teacher.shard (teacher partitioned by ZeRO-3 inference, its engine)."""
    max_len, seed = int(cfg.data.max_length), int(cfg.seed) + 1
    if not cfg.model.teacher.get("shard", False):
        teacher = models.build_model(cfg.model, "teacher", tokenizer, dtype, max_len, seed=seed)
        return teacher.requires_grad_(False).eval().to(device), None
    ds_config = eng.frozen_zero3_config(cfg.trainer)
    with eng.zero3_loading(ds_config) if cfg.model.teacher.get("path") else contextlib.nullcontext():
        teacher = models.build_model(cfg.model, "teacher", tokenizer, dtype, max_len, seed=seed)
    teacher_engine = eng.shard_frozen(teacher, cfg.trainer)
    return teacher_engine.module, teacher_engine


def _rollout(cfg: DictConfig, tokenizer, rdir: Path, step: int, sched: Schedule, *, world: int,
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


def _resume(engine, rdir: Path, rank: int) -> Progress:
    """Load the latest checkpoint if any (weights, optimizer, schedule, torch RNG, the running loss window and
    training time, the evaluations so far and the selected one); where training stands. The loss window is a
    global sum: rank 0 takes it, the rest start at 0, so the next train log (a sum over ranks) equals the
    uninterrupted run's."""
    state = eng.load_latest_checkpoint(engine, rdir) or {}
    step, tokens = int(state.get("step", 0)), int(state.get("tokens", 0))
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    p = Progress(step=step, tokens=tokens, tokens_at_start=tokens,
                 loss_sum=float(state.get("loss_sum", 0.0)) if rank == 0 else 0.0,
                 loss_steps=int(state.get("loss_steps", 0)), time_before=float(state.get("train_time_s", 0.0)),
                 evaluations=list(state.get("evaluations", [])), best=state.get("best"))
    p.ckpt_best_step = p.best["step"] if p.best else None
    if rank == 0:
        # exports of evaluations after the checkpoint belong to the lost attempt: they are redone
        _prune_selected(rdir, keep={p.ckpt_best_step})
    if p.best and not (_selected_dir(rdir, p.best["step"]) / "config.json").is_file():
        log.warning("the selected checkpoint of step %d is missing: selection restarts at step %d", p.best["step"], step)
        p.best = p.ckpt_best_step = None
    return p


def validation_batches(val_ex: list[dict], tcfg: DictConfig, pad_id: int, world: int,
                       micro: int | None = None) -> list[dict]:
    """`trainer.val_batches` micro-batches per rank (null: the whole split) from the head of the valid split,
    equal forwards per rank."""
    mbs = int(micro or tcfg.micro_batch_size)
    n_val = int(tcfg.val_batches) * world if tcfg.get("val_batches") is not None else math.ceil(len(val_ex) / mbs)
    batches = [data_mod.collate_train(val_ex[i * mbs:(i + 1) * mbs], pad_id) for i in range(n_val)
               if val_ex[i * mbs:(i + 1) * mbs]]
    return batches[: (len(batches) // world) * world]


# --------------------------------------------------------------------------------------------- one step
EXAMPLE_IDS = "example_ids"  # optional micro-batch key: the rows' indices in cell.train_examples (cache lookups)


def _no_lap(segment: str) -> None:
    """The default `lap` hook of `train_step`: timing is the caller's business (benchmarks)."""


def sample_batches(cell: Cell, step: int) -> list[dict]:
    """This rank's micro-batches of `step` (the schedule's accumulation), as the rollout supplies them, collated.
    Micro-batches of training examples carry their example ids; generated or replayed ones do not (the live
    teacher scores them)."""
    plan, n = cell.schedule.batch, len(cell.train_examples)
    ids = [sample_indices(n, step, m, cell.rank, world=cell.world, micro_bs=plan.micro, grad_accum=plan.accum,
                          seed=int(cell.cfg.seed)) for m in range(plan.accum)]
    policy = cell.engine.module if cell.rollout.samples_student else None
    out = []
    for mb in cell.rollout.micro_batches(step, ids, cell.train_examples, policy, cell.rank):
        batch = data_mod.collate_train(mb.examples, cell.tokenizer.pad_token_id)
        out.append(batch if mb.example_ids is None else {**batch, EXAMPLE_IDS: torch.tensor(mb.example_ids)})
    return out


def train_step(cell: Cell, step: int, micro_batches: list[dict] | None = None, *,
               lap: Callable[[str], None] = _no_lap) -> dict[str, Any]:
    """One optimizer step (0-based `step`): forward + loss + backward over the micro-batches, then the update.

    `micro_batches` default to the job's own for `step` (`sample_batches`); a caller such as an on-policy loop
    may pass its own: this rank's `cell.schedule.batch.accum` dicts of input_ids / attention_mask / labels
    (`data.collate_train`), with `EXAMPLE_IDS` only if the rows come from `cell.train_examples` (the teacher
    cache needs it; without it the live teacher runs). Accumulation is exact: every micro-batch loss is a masked
    sum over the step's global response-token count. `lap(segment)` is called after each segment (data,
    forward, loss, backward, step) so a benchmark can time the job's own step. Returns the step number done,
    this rank's loss (its share of the step's global mean), the global token count and the last micro-batch's
    loss parts.
    """
    gas = cell.schedule.batch.accum
    if micro_batches is None:
        micro_batches = sample_batches(cell, step)
    if len(micro_batches) != gas:
        raise ValueError(f"train_step needs {gas} micro-batches (the schedule's accumulation), got {len(micro_batches)}")
    local_tokens = sum(int(response_mask(b["labels"]).sum()) for b in micro_batches)
    num_tokens = max(_all_reduce_sum([local_tokens], cell.device)[0], 1.0)
    lap("data")
    p, loss_sum, parts = cell.progress, 0.0, {}
    for batch in micro_batches:
        loss, parts = micro_batch_loss(cell, batch, num_tokens, lap=lap)
        # DeepSpeed divides by grad_accum and averages over ranks; our loss is already the global mean.
        cell.engine.backward(loss * gas * cell.world)
        lap("backward")
        cell.engine.step()
        value = loss.item()
        loss_sum += value
        p.loss_sum += value
        lap("step")
    p.step, p.tokens, p.loss_steps = step + 1, p.tokens + int(num_tokens), p.loss_steps + 1
    return {"step": step + 1, "loss": loss_sum, "tokens": int(num_tokens), "parts": parts}


def micro_batch_loss(cell: Cell, batch: dict, num_tokens: float, *,
                     lap: Callable[[str], None] = _no_lap) -> tuple[torch.Tensor, dict[str, float]]:
    """Student forward, teacher logits (cache, live teacher or none) and the loss of one micro-batch."""
    ids = batch.get(EXAMPLE_IDS)
    batch = {k: v.to(cell.device) for k, v in batch.items() if k != EXAMPLE_IDS}
    cache = cell.cache if ids is not None else None
    t_hidden = None
    if cache is not None and cache.kind == "hidden":
        t_hidden = cache.batch_hidden(ids.tolist(), batch["labels"])
    if cell.cfg.loss.impl == "fused":
        loss, parts = fused_batch_loss(cell.cfg, cell.engine, cell.teacher, batch, num_tokens, t_hidden)
        lap("loss")
        return loss, parts
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_logits = cell.engine(**inputs).logits
    t_logits = None
    if t_hidden is not None:
        with torch.no_grad():
            t_logits = models.output_head(cell.teacher).logits(t_hidden)
    elif cache is not None:
        t_logits = cache.batch_logits(ids.tolist(), batch["labels"])
    elif cell.teacher is not None:
        with torch.no_grad():
            t_logits = cell.teacher(**inputs).logits
    lap("forward")
    loss, parts = batch_loss(cell.cfg, s_logits, t_logits, batch["labels"], num_tokens)
    lap("loss")
    return loss, parts


def after_step(cell: Cell, result: dict[str, Any], lock: locks.CellLock | None = None) -> None:
    """The loop's cadence after a step: train log, validation + checkpoint selection, checkpoint, progress bar;
    and the step boundary where a SIGTERM/SIGUSR2 on any rank (or a lost cell lock) stops every rank:
    checkpoint, then Interrupted."""
    tcfg, sched, done = cell.cfg.trainer, cell.schedule, result["step"]
    if done % int(tcfg.log_every) == 0 or done == sched.max_steps:
        _log_train(cell, result["parts"])
    if sched.eval_every and done % sched.eval_every == 0 and done != sched.max_steps:
        evaluation = evaluate_and_select(cell)
        if "ce" in evaluation:
            cell.rollout.observe_dev_loss(evaluation["ce"])  # SGO adapts its threshold here (DistiLLM: after each evaluation)
        cell.tracker.log({f"valid/{k}": v for k, v in evaluation.items() if k != "step"}, step=done)
    stop = _stop_requested(cell, lock)
    if isinstance(stop, LockLost):
        raise stop  # another run owns the dir now: write nothing more
    if stop is not None or (sched.ckpt_every and done % sched.ckpt_every == 0 and done != sched.max_steps):
        p = cell.progress
        if cell.rollout.stateful:  # before DeepSpeed's `latest` points at this tag
            cell.rollout.save(eng.checkpoint_dir(cell.run_dir, done), cell.rank)
        eng.save_checkpoint(cell.engine, cell.run_dir, done, _checkpoint_state(cell), keep=int(tcfg.keep_ckpts))
        p.ckpt_best_step = p.best["step"] if p.best else None
        if cell.rank == 0:
            _prune_selected(cell.run_dir, keep={p.ckpt_best_step})
    if cell.bar is not None:
        cell.bar.update(1)
    if stop is not None:
        cell_log.warning("step %d: %s; checkpoint saved", done, stop.reason)
        raise stop


def _stop_requested(cell: Cell, lock: locks.CellLock | None) -> Exception | BaseException | None:
    """Agree across ranks whether to stop now: a signal on any rank (Interrupted), a lost lock (LockLost)."""
    flags = torch.tensor([float(preempt.STATE.signum or 0), float(bool(lock is not None and lock.lost))],
                         dtype=torch.float64, device=cell.device)
    if cell.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    signum, lost = int(flags[0]), bool(flags[1])
    if lost:
        return LockLost(f"{cell.run_dir}: this run's cell lock was taken over (it looked dead): stopped without "
                        "writing; the run that holds it now finishes the cell")
    if signum:
        return preempt.Interrupted(signum, f"stopped by {signal.Signals(signum).name} at step "
                                           f"{cell.progress.step}")
    return None


def _checkpoint_state(cell: Cell) -> dict[str, Any]:
    """The client state saved with a checkpoint: where training stands, RNG, loss window, training time.
    Collective (the loss window is summed over ranks)."""
    p = cell.progress
    return {"step": p.step, "tokens": p.tokens, "torch_rng": torch.get_rng_state(),
            "loss_sum": _all_reduce_sum([p.loss_sum], cell.device)[0], "loss_steps": p.loss_steps,
            "train_time_s": p.time_before + (time.time() - p.t_start),
            "evaluations": p.evaluations, "best": p.best}


def _log_train(cell: Cell, parts: dict[str, float]) -> None:
    p = cell.progress
    # Summed over ranks, the micro-batch losses of a step add up to that step's global mean loss.
    step_loss = _all_reduce_sum([p.loss_sum], cell.device)[0] / p.loss_steps
    p.loss_sum, p.loss_steps = 0.0, 0
    tps = (p.tokens - p.tokens_at_start) / max(time.time() - p.t_start, 1e-9)
    lr = cell.engine.get_lr()[0]
    cell.tracker.log({"train/loss": step_loss, "train/lr": lr, "train/tokens": p.tokens,
                      "train/tokens_per_s": tps, **{f"train/{k}": v for k, v in parts.items()},
                      **cell.rollout.log_values()}, step=p.step)
    cell.metrics["train"]["final_loss"] = step_loss
    cell_log.info("step %d/%d loss %.6f lr %.3g tokens %d tok/s %.0f", p.step, cell.schedule.max_steps,
                  step_loss, lr, p.tokens, tps)
    if cell.bar is not None:
        cell.bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tps:,.0f}")


def validate(cell: Cell) -> dict[str, float]:
    """Teacher-forced CE (and FKL/RKL at tau=1 with a teacher) on the validation batches, over all ranks."""
    if not cell.val_batches:
        return {}
    val = validate_model(cell.engine.module, cell.teacher, cell.val_batches, cell.device, cell.rank, cell.world)
    cell.engine.train()
    return val


# --------------------------------------------------------------------------------------------- checkpoint selection
SELECTED_DIR = "selected"  # <run_dir>/selected/step<N>/: the HF export of the best evaluation so far


def _selected_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SELECTED_DIR / f"step{step:08d}"


def _prune_selected(run_dir: Path, keep: set) -> None:
    """Remove the selected exports whose step is not in `keep` (rank 0)."""
    for d in sorted((Path(run_dir) / SELECTED_DIR).glob("step*")):
        if int(d.name[4:]) not in keep:
            shutil.rmtree(d, ignore_errors=True)


def dev_rouge_l(cell: Cell) -> float:
    """ROUGE-L of the student's generations on the validation split (`trainer.select_examples` first
    examples), sampled as `eval` says with its first seed, the prompts sharded over the ranks; the same
    value on every rank. Under ZeRO-3 every rank generates as many prompts in lockstep (`synced_gpus`)."""
    cfg = cell.cfg
    n = cfg.trainer.get("select_examples")
    records = cell.splits.valid[: int(n)] if n else cell.splits.valid
    mine = records[cell.rank::cell.world]
    share = math.ceil(len(records) / cell.world)
    prompts = [data_mod.render_prompt(r, cfg.data.template, cell.tokenizer) for r in mine]
    prompts += prompts[:1] * (share - len(mine)) if mine else [data_mod.render_prompt(records[0], cfg.data.template,
                                                                                       cell.tokenizer)] * share
    e = cfg.eval
    outputs = evaluate.generate(
        cell.engine.module, cell.tokenizer, prompts, max_length=int(cfg.data.max_length),
        max_prompt_length=int(cfg.data.max_prompt_length), batch_size=int(e.batch_size), do_sample=bool(e.do_sample),
        top_k=int(e.top_k), top_p=float(e.top_p), temperature=float(e.temperature),
        no_repeat_ngram_size=int(e.no_repeat_ngram_size), max_new_tokens=e.get("max_new_tokens"),
        seed=int(e.seeds[0]), progress=False, truncation_side=cfg.data.get("truncation_side", "left"),
        synced_gpus=cell.engine.zero_optimization_stage() == 3,
    )
    scores = evaluate.rouge_l_scores(outputs[: len(mine)], [list(r.outputs) for r in mine]) if mine else []
    total, count = _all_reduce_sum([sum(scores), len(scores)], cell.device)
    return total / max(count, 1.0)


def _is_better(select: str, value: float, best: dict | None) -> bool:
    return best is None or (value < best["value"] if select == "loss" else value > best["value"])


def evaluate_and_select(cell: Cell, *, final: bool = False) -> dict[str, Any]:
    """One evaluation (collective): validation metrics and, for `trainer.select`, its value; the student is
    exported to `selected/` when it is the best so far (the final one is exported by `finish`). Returns the
    evaluation record (also appended to `cell.progress.evaluations`)."""
    select, p = cell.cfg.trainer.get("select", "last"), cell.progress
    record: dict[str, Any] = {"step": p.step, **validate(cell)}
    if select == "loss":
        record["select"] = record.get("ce", math.inf)
    elif select == "rougeL":
        record["select"] = dev_rouge_l(cell)
    p.evaluations.append(record)
    if select != "last" and _is_better(select, record["select"], p.best):
        p.best = {"step": p.step, "value": record["select"]}
        if not final:
            eng.export_hf(cell.engine, cell.tokenizer, _selected_dir(cell.run_dir, p.step), cell.rank)
            if cell.rank == 0:
                _prune_selected(cell.run_dir, keep={p.step, p.ckpt_best_step})
    return record


# --------------------------------------------------------------------------------------------- the end
def finish(cell: Cell) -> dict[str, Any]:
    """Final validation, export of the student as a plain HF model (all ranks), then on rank 0 generation +
    ROUGE-L on every benchmark, metrics.json and the W&B summary. Returns the metrics."""
    m, p, sched = cell.metrics, cell.progress, cell.schedule
    if cell.bar is not None:
        cell.bar.close()
    train_time = time.time() - p.t_start  # this attempt's; time_s adds the earlier attempts' (checkpointed)
    if m.get("attempts"):
        m["attempts"][-1].update(end_step=p.step, time_s=round(train_time, 3))
    final = evaluate_and_select(cell, final=True)
    m["train"].update(steps=sched.max_steps, tokens=p.tokens, time_s=round(p.time_before + train_time, 3),
                      rollout=cell.rollout.summary(), attempts=len(m.get("attempts") or [1]),
                      tokens_per_s=(p.tokens - p.tokens_at_start) / max(train_time, 1e-9))
    m["train"].setdefault("final_loss", float("nan"))
    if cell.device.type == "cuda":
        m["train"]["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(cell.device) / 2**30, 3)
    student_dir = cell.run_dir / "student"
    selected = p.best["step"] if p.best else sched.max_steps
    if selected == sched.max_steps:
        eng.export_hf(cell.engine, cell.tokenizer, student_dir, cell.rank)
    elif cell.rank == 0:  # an earlier evaluation won: its export is the cell's student
        shutil.rmtree(student_dir, ignore_errors=True)
        os.replace(_selected_dir(cell.run_dir, selected), student_dir)
    chosen = next(e for e in reversed(p.evaluations) if e["step"] == selected) if selected != p.step else final
    m["valid"] = {k: v for k, v in chosen.items() if k not in ("step", "select")}
    m["selection"] = {"by": cell.cfg.trainer.get("select", "last"), "step": selected,
                      "value": chosen.get("select"), "evaluations": p.evaluations}
    if cell.rank == 0:
        shutil.rmtree(cell.run_dir / SELECTED_DIR, ignore_errors=True)
    dist.barrier()
    cell.engine = cell.teacher = cell.teacher_engine = cell.cache = None  # free them before evaluation
    if cell.rank == 0:  # evaluation uses no collectives: the other ranks are done
        _evaluate_and_record(cell, student_dir)
    cell.tracker.finish(0)
    return m


def _evaluate_and_record(cell: Cell, student_dir: Path) -> None:
    """Generation + ROUGE-L on the exported (plain HF) model; metrics.json, W&B, drop the optimizer state."""
    cfg, m, max_steps = cell.cfg, cell.metrics, cell.schedule.max_steps
    model = models.load_model(student_dir, torch.float32).to(cell.device)
    t0 = time.time()
    m["eval"] = evaluate.evaluate_benchmarks(
        model, cell.tokenizer, cell.splits.benchmarks, eval_cfg=OmegaConf.to_container(cfg.eval, resolve=True),
        template=cfg.data.template, max_length=int(cfg.data.max_length),
        max_prompt_length=int(cfg.data.max_prompt_length), out_dir=cell.run_dir / "generations",
        truncation_side=str(cfg.data.get("truncation_side", "left")), progress=bool(cfg.trainer.progress),
    )
    generated = sum(r["n"] * len(r["seeds"]) for r in m["eval"].values())
    m["eval_examples_per_s"] = round(generated / max(time.time() - t0, 1e-9), 2)  # batched generation throughput
    _end_attempt(m, "completed")
    m.update(status="completed", updated_at=now_iso())
    gens = {b: read_generations(cell.run_dir / "generations", b) for b in m["eval"]}
    cell.tracker.log_final({**{f"valid/{k}": v for k, v in m["valid"].items()}, **tracking.eval_metrics(m["eval"])},
                           step=max_steps, tau=float(cfg.tau), generations=gens)
    cell.tracker.summary({f"train/{k}": v for k, v in m["train"].items() if isinstance(v, (int, float))})
    write_metrics(cell.run_dir, m)
    if not cfg.trainer.keep_final_ckpt:
        shutil.rmtree(cell.run_dir / eng.CKPT_DIR, ignore_errors=True)
    log.info("%s: %s", m["name"], {b: round(r["rougeL_mean"], 2) for b, r in m["eval"].items()})


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
        handler = _attach_cell_log(prepared.run_dir) if rank == 0 else None
        interrupted = False
        try:
            done = _on_rank0(lambda: None if cfg.force or not is_completed(prepared.run_dir)
                             else read_metrics(prepared.run_dir), rank, world)
            if done is not None:
                log.info("skip %s: %s already completed (force=true reruns it)", prepared.name, prepared.run_dir)
                return done
            cell = setup(cfg, prepared)
            with _failures_recorded(rank=cell.rank, run_dir=cell.run_dir, metrics=cell.metrics, tracker=cell.tracker,
                                    where=lambda: _where(cell)):
                signals.in_loop = True
                while cell.progress.step < cell.schedule.max_steps:
                    after_step(cell, train_step(cell, cell.progress.step), lock)
                signals.in_loop = False
                return finish(cell)
        except preempt.Interrupted:
            interrupted = True
            raise
        except Exception as exc:
            if handler is not None:  # errors before setup (the lock, the skip check) end up in the cell log too
                cell_log.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
            raise
        finally:
            signals.in_loop = False
            if lock is not None:
                lock.release()
            if handler is not None:
                _detach_cell_log(handler)
            if interrupted and rank == 0:
                signals.requeue()  # last: the next attempt finds the checkpoint, metrics and a free lock


def _attach_cell_log(run_dir: Path) -> logging.Handler:
    """Append this attempt's log records to `<cell>/train.log`: the distill loggers at INFO, other libraries'
    warnings, the loss lines and tracebacks of `cell_log` (which stay off the console)."""
    handler = logging.FileHandler(run_dir / CELL_LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    handler._distill_level = logging.getLogger("distill").level  # type: ignore[attr-defined]
    for name in ("", "distill.cell_log"):
        logging.getLogger(name).addHandler(handler)
    if logging.getLogger("distill").getEffectiveLevel() > logging.INFO:
        logging.getLogger("distill").setLevel(logging.INFO)
    cell_log.setLevel(logging.INFO)
    cell_log.info("attempt on %s pid %d %s", socket.gethostname(), os.getpid(), locks.slurm_ids() or "")
    return handler


def _detach_cell_log(handler: logging.Handler) -> None:
    for name in ("", "distill.cell_log"):
        logging.getLogger(name).removeHandler(handler)
    logging.getLogger("distill").setLevel(handler._distill_level)  # type: ignore[attr-defined]
    handler.close()
