"""The loss of one micro-batch: kd_ratio x distillation + (1 - kd_ratio) x cross-entropy.

Where the teacher's side comes from decides the path (`micro_batch_loss`):

    cache of hidden states   -> the teacher's output head makes its logits (or the fused loss reads them)
    cache of logits / top-k  -> the cached log-probs
    live teacher             -> a forward of the frozen teacher (replicated, or partitioned: model.teacher.shard)
    none (SFT, kd_ratio=0)   -> cross-entropy only

`loss.impl=fused` never builds full logits: `fused_batch_loss` works on final hidden states and output heads.
Every loss is a masked sum over the step's global response-token count, so accumulation is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distill import models
from distill.data.encoding import response_mask
from distill.losses.chunked import fused_distillation_loss, loss_fn_for
from distill.teachers.cache import TeacherCache
from distill.train import engine as eng
from distill.train.state import CellRun

EXAMPLE_IDS = "example_ids"  # optional micro-batch key: the rows' indices in cell.train_examples (cache lookups)


def no_lap(segment: str) -> None:
    """The default `lap` hook of `train_step`: timing is the caller's business (benchmarks)."""


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


def fused_batch_loss(cfg: DictConfig, engine: Any, teacher: torch.nn.Module, batch: dict, num_tokens: float,
                     teacher_hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
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


def _teacher_logits(cell: CellRun, batch: dict, inputs: dict, ids: torch.Tensor | None, cache: TeacherCache | None,
                    t_hidden: torch.Tensor | None) -> torch.Tensor | None:
    """The teacher's logits for `batch`: from cached hidden states, cached log-probs, the live teacher, or none."""
    if t_hidden is not None:
        with torch.no_grad():
            return models.output_head(cell.teacher).logits(t_hidden)
    if cache is not None:
        return cache.batch_logits(ids.tolist(), batch["labels"])
    if cell.teacher is not None:
        with torch.no_grad():
            return cell.teacher(**inputs).logits
    return None


def micro_batch_loss(cell: CellRun, batch: dict, num_tokens: float, *,
                     lap: Callable[[str], None] = no_lap) -> tuple[torch.Tensor, dict[str, float]]:
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
    t_logits = _teacher_logits(cell, batch, inputs, ids, cache, t_hidden)
    lap("forward")
    loss, parts = batch_loss(cell.cfg, s_logits, t_logits, batch["labels"], num_tokens)
    lap("loss")
    return loss, parts
