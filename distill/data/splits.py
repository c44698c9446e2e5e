"""The data config -> splits: train / valid records, the named benchmarks and (embedded) the tokenizer.

`load_data` reads a ``conf/data/*.yaml`` config with the readers of `distill.data` (external files, the
Hub) or the generated suite of `distill.data.embedded`; it sits in its own module so that neither of those two
imports the other's caller (tasks builds on data's records and templates).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import plain
from distill.options import LONG_PROMPT_POLICIES
from distill.data.records import Record, load_hub_records, read_records, read_records_with_stats
from distill.data.encoding import render_prompt
from distill.data.embedded import SPLITS, prepare_embedded

log = logging.getLogger(__name__)

EMBEDDED_EVAL_SETS = tuple(s for s in SPLITS if s not in ("train", "valid"))  # the suite's benchmarks
# Which reader a benchmark name uses unless data.benchmark_formats says otherwise.
BENCHMARK_FORMATS = {"dolly": "dolly", "selfinst": "selfinst", "vicuna": "vicuna", "sinst": "sinst", "uninst": "uninst"}


def split_valid(records: Sequence[Record], valid_size: int = 1000) -> tuple[list[Record], list[Record]]:
    """(train, valid): the FIRST ``valid_size`` records are validation, as DistiLLM/MiniLLM do."""
    if not 0 < valid_size < len(records):
        raise ValueError(f"valid_size must be in 1..{len(records) - 1} for {len(records)} records, got {valid_size}")
    return list(records[valid_size:]), list(records[:valid_size])


@dataclass
class DataSplits:
    """What a training run needs: train/valid records, named eval sets, and (embedded) the tokenizer."""

    train: list[Record]
    valid: list[Record]
    benchmarks: dict[str, list[Record]]
    tokenizer_dir: Path | None = None
    stats: dict[str, int] = field(default_factory=dict)


def _key(r: Record) -> tuple[str, str]:
    return (r.instruction.strip(), r.input.strip())


def prompt_too_long(record: Record, tokenizer: Any, template: str, max_prompt_length: int) -> bool:
    """True when the rendered prompt has more than ``max_prompt_length`` tokens (MiniLLM's drop rule)."""
    prompt = render_prompt(record, template, tokenizer)
    return len(tokenizer.encode(prompt, add_special_tokens=False)) > max_prompt_length


def load_data(data_cfg: Any, data_root: Path, tokenizer: Any = None) -> DataSplits:
    """Build train / valid / benchmark records from a ``conf/data/*.yaml`` config.

    kind=embedded: the generated suite (`distill.data.embedded.prepare_embedded` under ``data_root``);
    ``tokenizer_dir`` is its tokenizer. kind=jsonl: ``train_file`` read with ``fmt``; kind=hub:
    ``hub_id`` via `data.load_hub_records`. For jsonl/hub, the last ``test_size`` records become the
    benchmark named ``name`` when its file is null, the first ``valid_size`` of the rest (or
    ``valid_file``) are validation, and training records whose (instruction, input) occur in any
    benchmark are dropped (counted in ``stats``) unless ``drop_overlap`` is false. If ``tokenizer``
    is given, ``stats`` also counts training prompts longer than ``max_prompt_length``: they are
    truncated at encode time (``long_prompts=truncate``), or dropped from train and valid
    (``long_prompts=drop``, MiniLLM's rule; needs the tokenizer).
    """
    cfg = plain(data_cfg)
    kind = cfg.get("kind")
    stats: Counter = Counter()
    tokenizer_dir = None
    if kind == "embedded":
        suite = prepare_embedded(cfg, Path(data_root))
        tokenizer_dir = suite / "tokenizer"
        train, valid = read_records(suite / "train.jsonl"), read_records(suite / "valid.jsonl")
        benchmarks = {}
        for name in cfg.get("benchmarks") or []:
            if name not in EMBEDDED_EVAL_SETS:
                allowed = ", ".join(EMBEDDED_EVAL_SETS)
                raise ValueError(f"embedded suite has no benchmark {name!r}; available: {allowed}")
            benchmarks[name] = read_records(suite / f"{name}.jsonl")
    elif kind in ("jsonl", "hub"):
        train, valid, benchmarks = _load_external(cfg, kind, stats)
    else:
        raise ValueError(f"unknown data.kind {kind!r}; allowed: embedded, jsonl, hub")
    if not train:
        raise ValueError("the training set is empty")
    for name, recs in benchmarks.items():
        if not recs:
            raise ValueError(f"benchmark {name!r} is empty")
    policy = cfg.get("long_prompts") or "truncate"
    if policy not in LONG_PROMPT_POLICIES:
        raise ValueError(f"data.long_prompts={policy!r}; allowed: {', '.join(LONG_PROMPT_POLICIES)}")
    if policy == "drop" and tokenizer is None:
        raise ValueError("data.long_prompts=drop counts prompt tokens: load_data needs the tokenizer")
    if tokenizer is not None:
        limit = int(cfg.get("max_prompt_length", 256))
        template = cfg.get("template", "alpaca")
        long_train = [prompt_too_long(r, tokenizer, template, limit) for r in train]
        stats["train_prompts_over_max"] = sum(long_train)
        if policy == "drop":
            # MiniLLM (tools/process_data_dolly.py) drops such examples from train and valid, keeps the test set
            long_valid = [prompt_too_long(r, tokenizer, template, limit) for r in valid]
            train = [r for r, too_long in zip(train, long_train) if not too_long]
            valid = [r for r, too_long in zip(valid, long_valid) if not too_long]
            stats["valid_prompts_over_max"] = sum(long_valid)
            if not train or not valid:
                raise ValueError(f"data.long_prompts=drop left no {'training' if not train else 'validation'} "
                                 f"examples: every prompt is over max_prompt_length={limit} tokens")
    return DataSplits(train=train, valid=valid, benchmarks=benchmarks, tokenizer_dir=tokenizer_dir, stats=dict(stats))


def _load_external(cfg: dict[str, Any], kind: str, stats: Counter
                   ) -> tuple[list[Record], list[Record], dict[str, list[Record]]]:
    """kind=jsonl|hub: read the pool, the benchmarks (or hold out our own test), split valid, drop overlap."""
    fmt = cfg.get("fmt") or ("dolly" if kind == "hub" else "jsonl")
    if kind == "jsonl":
        if not cfg.get("train_file"):
            raise ValueError("data.kind=jsonl needs data.train_file (a JSONL file in the MiniLLM schema)")
        pool, counts = read_records_with_stats(cfg["train_file"], fmt)
        stats.update(counts)
    else:
        if not cfg.get("hub_id"):
            raise ValueError("data.kind=hub needs data.hub_id")
        pool = load_hub_records(cfg["hub_id"], split=cfg.get("hub_split") or "train", fmt=fmt,
                                cache_dir=cfg.get("hub_cache_dir"))

    files = cfg.get("benchmark_files") or {}
    formats = {**BENCHMARK_FORMATS, **(cfg.get("benchmark_formats") or {})}
    limits = cfg.get("benchmark_limits") or {}
    benchmarks: dict[str, list[Record]] = {}
    for name in cfg.get("benchmarks") or []:
        path = files.get(name)
        if path:
            recs, counts = read_records_with_stats(path, formats.get(name, "jsonl"))
            stats.update({f"{name}_{k}": v for k, v in counts.items()})
        elif name == cfg.get("name") and cfg.get("test_size"):
            # no released test file: hold out the LAST test_size records of the training pool
            n = int(cfg["test_size"])
            if not 0 < n < len(pool):
                raise ValueError(f"test_size must be in 1..{len(pool) - 1} for {len(pool)} records, got {n}")
            pool, recs = pool[:-n], pool[-n:]
        else:
            raise ValueError(f"benchmark {name!r} has no file: set data.benchmark_files.{name}=/path/to/valid.jsonl "
                             "(see README)")
        if limits.get(name):
            recs = recs[: int(limits[name])]
        benchmarks[name] = recs

    if cfg.get("valid_file"):
        train, valid = pool, read_records(cfg["valid_file"], fmt)
    elif cfg.get("valid_size"):
        train, valid = split_valid(pool, int(cfg["valid_size"]))
    else:
        raise ValueError("set data.valid_size (first N records held out) or data.valid_file")

    if not cfg.get("drop_overlap", True):
        return train, valid, benchmarks  # MiniLLM's split: every line after the first valid_size trains
    held_out = {_key(r) for recs in benchmarks.values() for r in recs} | {_key(r) for r in valid}
    kept = [r for r in train if _key(r) not in held_out]
    stats["train_dropped_overlap"] = len(train) - len(kept)
    if len(kept) < len(train):
        log.warning("dropped %d training records that also occur in valid/benchmarks", len(train) - len(kept))
    return kept, valid, benchmarks
