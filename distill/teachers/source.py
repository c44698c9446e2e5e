"""Where the teacher comes from: a frozen model (a full copy per rank, or partitioned across the ranks by
ZeRO-3 inference: model.teacher.shard), and the cache of its outputs on the training examples
(loss.teacher_cache, distill/teachers/cache.py) that stands in for it during training.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distill import models
from distill.config import cache_wait_problem
from distill.options import ConfigError
from distill.teachers.cache import WAIT_S, TeacherCache, resolve_kind
from distill.train import engine as eng


def _build(cfg: DictConfig, tokenizer: Any, dtype: torch.dtype) -> torch.nn.Module:
    return models.build_model(cfg.model, "teacher", tokenizer, dtype, int(cfg.data.max_length), seed=int(cfg.seed) + 1)


def load_teacher(cfg: DictConfig, tokenizer: Any, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A full copy of the teacher on `device`, frozen and in eval mode."""
    return _build(cfg, tokenizer, dtype).requires_grad_(False).eval().to(device)


def build_teacher(cfg: DictConfig, tokenizer: Any, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(teacher, None), or with model.teacher.shard (teacher partitioned by ZeRO-3 inference, its engine).

    A partitioned teacher given by a path is loaded under zero.Init, so no rank ever holds all of it."""
    if not cfg.model.teacher.get("shard", False):
        return load_teacher(cfg, tokenizer, dtype, device), None
    ds_config = eng.frozen_zero3_config(cfg.trainer)
    with eng.zero3_loading(ds_config) if cfg.model.teacher.get("path") else contextlib.nullcontext():
        teacher = _build(cfg, tokenizer, dtype)
    teacher_engine = eng.shard_frozen(teacher, cfg.trainer)
    return teacher_engine.module, teacher_engine


def _cache_kind(cfg: DictConfig, hidden: int, vocab: int, dtype: torch.dtype) -> str | None:
    """The form loss.teacher_cache asks for on this teacher (None: no cache, the live teacher)."""
    setting = cfg.loss.teacher_cache
    if setting == "auto" and not cfg.model.teacher.get("path"):
        setting = False  # the cache is keyed by the teacher's files: a teacher built from sizes runs live
    kind = resolve_kind(setting, hidden_size=hidden, vocab_size=vocab, dtype=dtype,
                        topk=cfg.loss.get("teacher_cache_topk"))
    if kind == "logits" and cfg.loss.impl == "fused" and cfg.loss.teacher_cache in (True, "auto"):
        kind = "hidden"  # the fused loss reads hidden states, whichever form would be smaller
    return kind


def cache_wait_s(cfg: DictConfig) -> float | None:
    """loss.teacher_cache_wait_s: how long a cell waits for another cell's cache build that makes no progress
    (None: for ever); a value that is neither raises a ConfigError."""
    value = cfg.loss.get("teacher_cache_wait_s", WAIT_S)
    if (problem := cache_wait_problem(value)) is not None:   # check_config refuses it first; a direct caller here
        raise ConfigError(problem)
    return None if value is None else float(value)


def teacher_cache(cfg: DictConfig, teacher: torch.nn.Module, train_ex: list[dict], *, pad_id: int,
                  dtype: torch.dtype, device: torch.device, rank: int) -> TeacherCache | None:
    """The teacher's outputs on `train_ex` in the form loss.teacher_cache asks for (None: the live teacher)."""
    t_head = models.output_head(teacher)
    vocab, hidden = (int(x) for x in models.param_shape(t_head.weight))
    kind = _cache_kind(cfg, hidden, vocab, dtype)
    if cfg.loss.impl == "fused" or kind == "hidden":
        models.check_output_head(teacher, t_head, "teacher")  # its head will make the logits
    if kind is None:
        return None
    return TeacherCache.build_or_load(
        Path(cfg.paths.cache_dir), teacher, cfg.model.teacher.path, train_ex, pad_id=pad_id,
        batch_size=int(cfg.trainer.micro_batch_size), kind=kind, topk=cfg.loss.get("teacher_cache_topk"),
        device=device, dtype=dtype, progress=rank == 0 and bool(cfg.trainer.progress), wait_s=cache_wait_s(cfg),
    )
