"""One optimizer step and the cadence after it.

    sample_batches(cell, step)     this rank's micro-batches of the step (sample_indices, then the rollout)
    train_step(cell, step)         forward + loss + backward over them (exact accumulation), then the update
    after_step(cell, result)       `check_step` (the lock still held, a finite loss: before anything of the step
                                   is written), train log, evaluation + selection, checkpoint; the step boundary
                                   (`stop_if_requested`) where a SIGTERM/SIGUSR2 (or a lost cell lock) stops
                                   every rank

A checkpoint holds the student (DeepSpeed) and `checkpoint_state`: where training stands, the RNG, the loss
window, the training time and the evaluations so far; `resume` loads the latest one. A signal always ends in a
checkpoint, trainer.ckpt_every=0 included: the resumed attempt starts where the stopped one was.
"""

from __future__ import annotations

import math
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
from distill.options import LockLost, TrainingDiverged
from distill.tracking import cell_log
from distill.train import engine as eng
from distill.train.distributed import all_reduce_max, all_reduce_sum, ensure_lock_held
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
def after_step(cell: CellRun, result: dict[str, Any]) -> None:
    """The loop's cadence after a step: `check_step` before anything of the step is written, then the train log,
    validation + checkpoint selection, the progress bar, the step boundary where a SIGTERM/SIGUSR2 on any rank
    (or a lost cell lock) stops every rank (`stop_if_requested`: checkpoint, then Interrupted), and the
    checkpoint on its cadence."""
    tcfg, sched, done = cell.cfg.trainer, cell.schedule, result["step"]
    check_step(cell, result)
    if done % int(tcfg.log_every) == 0 or done == sched.max_steps:
        _log_train(cell, result["parts"])
    if sched.eval_every and done % sched.eval_every == 0 and done != sched.max_steps:
        _evaluate(cell, done)
    if cell.bar is not None:
        cell.bar.update(1)
    stop_if_requested(cell, f"step {done}")
    if sched.ckpt_every and done % sched.ckpt_every == 0 and done != sched.max_steps:
        _save_checkpoint(cell, done)


def check_step(cell: CellRun, result: dict[str, Any]) -> None:
    """Collective, before anything of the step is written: a cell lock rank 0 no longer holds stops every rank
    (LockLost, nothing written), and so does a loss or gradient norm that is not finite on any rank
    (TrainingDiverged: the cell fails at this step instead of training on NaN weights to the end)."""
    norm = _grad_norm(cell)
    lost = cell.lock is not None and not cell.lock.holds()
    flags = all_reduce_max([float(lost), float(not math.isfinite(result["loss"])),
                            float(norm is not None and not math.isfinite(norm))], cell.device)
    if flags[0]:
        raise locks.lost_error(cell.run_dir, f"writing step {result['step']}",
                               cell.lock.lost_why if cell.lock is not None else None)
    if flags[1] or flags[2]:
        loss = all_reduce_sum([result["loss"]], cell.device)[0]  # the step's global mean loss
        raise diverged(cell, result["step"], loss, norm)


def _grad_norm(cell: CellRun) -> float | None:
    """The step's global gradient norm when DeepSpeed reports it (ZeRO 1-3, bf16); None otherwise, and under
    fp16, whose loss scaler skips a step that overflows (an inf norm there is routine, not divergence)."""
    if cell.engine.fp16_enabled():
        return None
    norm = cell.engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def diverged(cell: CellRun, step: int, loss: float, norm: float | None) -> TrainingDiverged:
    """The one line of a step whose loss or gradient norm is not finite: which step, what value, what to try."""
    t = cell.cfg.trainer
    what = (f"the training loss is {loss}" if not math.isfinite(loss)
            else f"the gradient norm is {norm} (loss {loss:.4g})")
    tries = [f"a lower trainer.lr (it is {float(t.lr):.3g}: e.g. {float(t.lr) / 10:.3g})"]
    if not float(t.grad_clip):
        tries.append("trainer.grad_clip=1.0")
    if t.precision == "fp16":
        tries.append("trainer.precision=bf16")
    return TrainingDiverged(f"step {step}/{cell.schedule.max_steps}: {what}: training diverged, the cell stops "
                            f"here; try {' or '.join(tries)}")


def _evaluate(cell: CellRun, done: int) -> None:
    """An evaluation on the cadence: selection, the rollout's dev-loss hook, the tracker."""
    evaluation = evaluate_and_select(cell)
    if "ce" in evaluation:
        cell.rollout.observe_dev_loss(evaluation["ce"])  # SGO adapts its threshold here (DistiLLM: after each evaluation)
    ensure_lock_held(cell.lock, cell.run_dir, cell.device, f"logging the evaluation of step {done}")
    cell.tracker.log({f"valid/{k}": v for k, v in evaluation.items() if k != "step"}, step=done)


def stop_if_requested(cell: CellRun, where: str, state: dict[str, Any] | None = None) -> None:
    """A step boundary (collective): a SIGTERM/SIGUSR2 on any rank stops every rank with a checkpoint of
    `state` (default: where training stands now; none when the latest checkpoint is of this step already),
    then Interrupted; a cell lock rank 0 no longer holds stops them with LockLost, writing nothing."""
    stop = _stop_requested(cell)
    if stop is None:
        return
    if isinstance(stop, LockLost):
        raise stop  # another run owns the dir now: write nothing more
    if cell.progress.ckpt_step != cell.progress.step:
        _save_checkpoint(cell, cell.progress.step, state)
    cell_log.logger.warning("%s: %s; checkpoint saved", where, stop.reason)
    raise stop


def _stop_requested(cell: CellRun) -> Exception | BaseException | None:
    """Agree across ranks whether to stop now: a signal on any rank (Interrupted), a lost lock (LockLost)."""
    lock = cell.lock
    flags = all_reduce_max([float(preempt.STATE.signum or 0), float(lock is not None and not lock.holds())],
                           cell.device)
    signum, lost = int(flags[0]), bool(flags[1])
    if lost:
        return locks.lost_error(cell.run_dir, f"the end of step {cell.progress.step}",
                                lock.lost_why if lock is not None else None)
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
def _save_checkpoint(cell: CellRun, done: int, state: dict[str, Any] | None = None) -> None:
    """The rollout's state, the student and `state` (default `checkpoint_state`) at step `done`; the selected
    exports that the checkpoint no longer needs go. Collective."""
    state = checkpoint_state(cell) if state is None else state
    if cell.rollout.stateful:  # before DeepSpeed's `latest` points at this tag
        cell.rollout.save(eng.checkpoint_dir(cell.run_dir, done), cell.rank)
    eng.save_checkpoint(cell.engine, cell.run_dir, done, state, keep=int(cell.cfg.trainer.keep_ckpts))
    cell.progress.ckpt_step = done
    keep_checkpointed_best(cell.progress, cell.run_dir, cell.rank, state["best"])


def checkpoint_state(cell: CellRun) -> dict[str, Any]:
    """The client state saved with a checkpoint: where training stands, RNG, loss window, training time.
    Collective (the loss window is summed over ranks)."""
    p = cell.progress
    return {"step": p.step, "tokens": p.tokens, "torch_rng": torch.get_rng_state(),
            "loss_sum": all_reduce_sum([p.loss_sum], cell.device)[0], "loss_steps": p.loss_steps,
            "train_time_s": p.time_before + (time.time() - p.t_start),
            # copies: a state taken before the final evaluation is saved after it (finish) without its record
            "evaluations": [dict(e) for e in p.evaluations], "best": dict(p.best) if p.best else None}


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
                 evaluations=list(state.get("evaluations", [])), best=state.get("best"),
                 ckpt_step=step if state else None)
    resume_selection(p, rdir, rank)
    return p


def resume_point(run_dir: Path) -> str:
    """Where the cell's next attempt starts, as its checkpoints say (the requeue message): `from its checkpoint
    at step 4`, or `from step 0 (no checkpoint was saved)`."""
    try:
        tag = (Path(run_dir) / eng.CKPT_DIR / "latest").read_text(errors="replace").strip()
    except OSError:
        tag = ""
    if eng.CKPT_TAG.match(tag):
        return f"from its checkpoint at step {int(tag[4:])}"
    return "from step 0 (no checkpoint was saved)"
