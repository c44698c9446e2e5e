"""One optimizer step and the cadence after it.

    sample_batches(cell, step)     this rank's micro-batches of the step (sample_indices, then the rollout)
    train_step(cell, step)         forward + loss + backward over them (exact accumulation), then the update
    after_step(cell, result)       train log, evaluation + selection, checkpoint; the step boundary where a
                                   SIGTERM/SIGUSR2 (or a lost cell lock) stops every rank

A checkpoint holds the student (DeepSpeed) and `checkpoint_state`: where training stands, the RNG, the loss
window, the training time and the evaluations so far; `resume` loads the latest one.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distill.cell import lock as locks
from distill.cell import preemption as preempt
from distill.data import encoding
from distill.data.encoding import response_mask
from distill.options import LockLost
from distill.tracking import cell_log
from distill.train import engine as eng
from distill.train.distributed import all_reduce_max, all_reduce_sum
from distill.train.objective import EXAMPLE_IDS, micro_batch_loss, no_lap
from distill.train.selection import evaluate_and_select, keep_checkpointed_best, resume_selection
from distill.train.state import CellRun, Progress


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


def sample_batches(cell: CellRun, step: int) -> list[dict]:
    """This rank's micro-batches of `step` (the schedule's accumulation), as the rollout supplies them, collated.
    Micro-batches of training examples carry their example ids; generated or replayed ones do not (the live
    teacher scores them)."""
    plan, n = cell.schedule.batch, len(cell.train_examples)
    ids = [sample_indices(n, step, m, cell.rank, world=cell.world, micro_bs=plan.micro, grad_accum=plan.accum,
                          seed=int(cell.cfg.seed)) for m in range(plan.accum)]
    policy = cell.engine.module if cell.rollout.samples_student else None
    out = []
    for mb in cell.rollout.micro_batches(step, ids, cell.train_examples, policy, cell.rank):
        batch = encoding.collate_train(mb.examples, cell.tokenizer.pad_token_id)
        out.append(batch if mb.example_ids is None else {**batch, EXAMPLE_IDS: torch.tensor(mb.example_ids)})
    return out


# --------------------------------------------------------------------------------------------- the step
def train_step(cell: CellRun, step: int, micro_batches: list[dict] | None = None, *,
               lap: Callable[[str], None] = no_lap) -> dict[str, Any]:
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
    num_tokens = max(all_reduce_sum([local_tokens], cell.device)[0], 1.0)
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


# --------------------------------------------------------------------------------------------- after the step
def after_step(cell: CellRun, result: dict[str, Any], lock: locks.CellLock | None = None) -> None:
    """The loop's cadence after a step: train log, validation + checkpoint selection, checkpoint, progress bar;
    and the step boundary where a SIGTERM/SIGUSR2 on any rank (or a lost cell lock) stops every rank:
    checkpoint, then Interrupted."""
    tcfg, sched, done = cell.cfg.trainer, cell.schedule, result["step"]
    if done % int(tcfg.log_every) == 0 or done == sched.max_steps:
        _log_train(cell, result["parts"])
    if sched.eval_every and done % sched.eval_every == 0 and done != sched.max_steps:
        _evaluate(cell, done)
    stop = _stop_requested(cell, lock)
    if isinstance(stop, LockLost):
        raise stop  # another run owns the dir now: write nothing more
    if stop is not None or (sched.ckpt_every and done % sched.ckpt_every == 0 and done != sched.max_steps):
        _save_checkpoint(cell, done)
    if cell.bar is not None:
        cell.bar.update(1)
    if stop is not None:
        cell_log.logger.warning("step %d: %s; checkpoint saved", done, stop.reason)
        raise stop


def _evaluate(cell: CellRun, done: int) -> None:
    """An evaluation on the cadence: selection, the rollout's dev-loss hook, the tracker."""
    evaluation = evaluate_and_select(cell)
    if "ce" in evaluation:
        cell.rollout.observe_dev_loss(evaluation["ce"])  # SGO adapts its threshold here (DistiLLM: after each evaluation)
    cell.tracker.log({f"valid/{k}": v for k, v in evaluation.items() if k != "step"}, step=done)


def _stop_requested(cell: CellRun, lock: locks.CellLock | None) -> Exception | BaseException | None:
    """Agree across ranks whether to stop now: a signal on any rank (Interrupted), a lost lock (LockLost)."""
    flags = all_reduce_max([float(preempt.STATE.signum or 0), float(bool(lock is not None and lock.lost))],
                           cell.device)
    signum, lost = int(flags[0]), bool(flags[1])
    if lost:
        return LockLost(f"{cell.run_dir}: this run's cell lock was taken over (it looked dead): stopped without "
                        "writing; the run that holds it now finishes the cell")
    if signum:
        return preempt.Interrupted(signum, f"stopped by {signal.Signals(signum).name} at step "
                                           f"{cell.progress.step}")
    return None


def _log_train(cell: CellRun, parts: dict[str, float]) -> None:
    p = cell.progress
    # Summed over ranks, the micro-batch losses of a step add up to that step's global mean loss.
    step_loss = all_reduce_sum([p.loss_sum], cell.device)[0] / p.loss_steps
    p.loss_sum, p.loss_steps = 0.0, 0
    tps = (p.tokens - p.tokens_at_start) / max(time.time() - p.t_start, 1e-9)
    lr = cell.engine.get_lr()[0]
    cell.tracker.log({"train/loss": step_loss, "train/lr": lr, "train/tokens": p.tokens,
                      "train/tokens_per_s": tps, **{f"train/{k}": v for k, v in parts.items()},
                      **cell.rollout.log_values()}, step=p.step)
    cell.metrics["train"]["final_loss"] = step_loss
    cell_log.logger.info("step %d/%d loss %.6f lr %.3g tokens %d tok/s %.0f", p.step, cell.schedule.max_steps,
                         step_loss, lr, p.tokens, tps)
    if cell.bar is not None:
        cell.bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tps:,.0f}")


# --------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(cell: CellRun, done: int) -> None:
    """The rollout's state, the student and `checkpoint_state` at step `done`; the selected exports that the
    checkpoint no longer needs go. Collective."""
    if cell.rollout.stateful:  # before DeepSpeed's `latest` points at this tag
        cell.rollout.save(eng.checkpoint_dir(cell.run_dir, done), cell.rank)
    eng.save_checkpoint(cell.engine, cell.run_dir, done, checkpoint_state(cell), keep=int(cell.cfg.trainer.keep_ckpts))
    keep_checkpointed_best(cell.progress, cell.run_dir, cell.rank)


def checkpoint_state(cell: CellRun) -> dict[str, Any]:
    """The client state saved with a checkpoint: where training stands, RNG, loss window, training time.
    Collective (the loss window is summed over ranks)."""
    p = cell.progress
    return {"step": p.step, "tokens": p.tokens, "torch_rng": torch.get_rng_state(),
            "loss_sum": all_reduce_sum([p.loss_sum], cell.device)[0], "loss_steps": p.loss_steps,
            "train_time_s": p.time_before + (time.time() - p.t_start),
            "evaluations": p.evaluations, "best": p.best}


def resume(engine: Any, rdir: Path, rank: int) -> Progress:
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
    resume_selection(p, rdir, rank)
    return p
