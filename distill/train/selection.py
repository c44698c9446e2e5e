"""Evaluations during training and checkpoint selection: which step's student is the cell's result.

Every `trainer.eval_every` steps (and once at the end) `evaluate_and_select` runs the validation loss
(`validate`) and, for `trainer.select`, the value that ranks the evaluations: the dev CE (`loss`) or the dev
ROUGE-L of generations (`rougeL`); `last` keeps the final step. The best evaluation so far is exported to
`<run_dir>/selected/step<N>/`; `finish` copies it to the cell's `student/`. The export stays until the cell is
completed: a preemption at any point before that resumes with it. The evaluations and the best one are
checkpointed with the training state, and `resume_selection` puts them back consistently.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from distill.data import encoding
from distill.evaluation import generate as evaluate
from distill.train import engine as eng
from distill.train.distributed import all_reduce_sum, ensure_lock_held
from distill.train.state import CellRun, Progress

log = logging.getLogger("distill.train")

SELECTED_DIR = "selected"  # <run_dir>/selected/step<N>/: the HF export of the best evaluation so far


# --------------------------------------------------------------------------------------------- validation loss
def validate_model(student: torch.nn.Module, teacher: torch.nn.Module | None, val_batches: list[dict],
                   device: torch.device, rank: int, world: int) -> dict[str, float]:
    """Teacher-forced CE (and FKL/RKL at tau=1 when a teacher exists), exact over all ranks' shards.

    Every rank runs the same number of forwards (ZeRO-3 forwards are collective).
    """
    shard = [{k: v.to(device) for k, v in b.items()} for b in val_batches[rank::world]]
    m = evaluate.teacher_forced_metrics(student, shard, teacher=teacher, allow_empty=True)
    keys = [k for k in ("ce", "fkl", "rkl") if k in m]
    sums = all_reduce_sum([m[k] * m["tokens"] for k in keys] + [m["tokens"]], device)
    total = max(sums[-1], 1.0)
    return {k: s / total for k, s in zip(keys, sums[:-1])}


def validate(cell: CellRun) -> dict[str, float]:
    """Teacher-forced CE (and FKL/RKL at tau=1 with a teacher) on the validation batches, over all ranks."""
    if not cell.val_batches:
        return {}
    val = validate_model(cell.engine.module, cell.teacher, cell.val_batches, cell.device, cell.rank, cell.world)
    cell.engine.train()
    return val


def dev_rouge_l(cell: CellRun) -> float:
    """ROUGE-L of the student's generations on the validation split (`trainer.select_examples` first
    examples), sampled as `eval` says with its first seed, the prompts sharded over the ranks; the same
    value on every rank. Under ZeRO-3 every rank generates as many prompts in lockstep (`synced_gpus`)."""
    cfg = cell.cfg
    n = cfg.trainer.get("select_examples")
    records = cell.splits.valid[: int(n)] if n else cell.splits.valid
    mine = records[cell.rank::cell.world]
    share = math.ceil(len(records) / cell.world)
    prompts = [encoding.render_prompt(r, cfg.data.template, cell.tokenizer) for r in mine]
    prompts += prompts[:1] * (share - len(mine)) if mine else [encoding.render_prompt(records[0], cfg.data.template,
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
    total, count = all_reduce_sum([sum(scores), len(scores)], cell.device)
    return total / max(count, 1.0)


# --------------------------------------------------------------------------------------------- selection
def selected_dir(run_dir: Path, step: int) -> Path:
    """Where the export of the evaluation at `step` lives while it is the best so far."""
    return Path(run_dir) / SELECTED_DIR / f"step{step:08d}"


def prune_selected(run_dir: Path, keep: set) -> None:
    """Remove the selected exports whose step is not in `keep` (rank 0)."""
    for d in sorted((Path(run_dir) / SELECTED_DIR).glob("step*")):
        if int(d.name[4:]) not in keep:
            shutil.rmtree(d, ignore_errors=True)


def _is_better(select: str, value: float, best: dict | None) -> bool:
    return best is None or (value < best["value"] if select == "loss" else value > best["value"])


def evaluate_and_select(cell: CellRun, *, final: bool = False) -> dict[str, Any]:
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
            ensure_lock_held(cell.lock, cell.run_dir, cell.device, f"exporting the evaluation of step {p.step}")
            eng.export_hf(cell.engine, cell.tokenizer, selected_dir(cell.run_dir, p.step), cell.rank)
            if cell.rank == 0:
                prune_selected(cell.run_dir, keep={p.step, p.ckpt_best_step})
    return record


def keep_checkpointed_best(p: Progress, run_dir: Path, rank: int, best: dict | None) -> None:
    """The latest checkpoint records `best` (the best evaluation in its state): its export is kept, the others
    go (rank 0)."""
    p.ckpt_best_step = best["step"] if best else None
    if rank == 0:
        prune_selected(run_dir, keep={p.ckpt_best_step})


def resume_selection(p: Progress, run_dir: Path, rank: int) -> None:
    """After loading a checkpoint into `p`: keep only the export of the checkpoint's best step (exports of
    evaluations after the checkpoint belong to the lost attempt: they are redone), and restart the selection
    when that export is missing."""
    keep_checkpointed_best(p, run_dir, rank, p.best)
    if p.best and not (selected_dir(run_dir, p.best["step"]) / "config.json").is_file():
        log.warning("the selected checkpoint of step %d is missing: selection restarts at step %d", p.best["step"],
                    p.step)
        p.best = p.ckpt_best_step = None
