"""Sequence-level KD (Kim & Rush, 2016): every training prompt gets one response sampled from the teacher, once per
grid, cached on disk like the teacher cache (`<cache_dir>/seqkd-<key>.safetensors`) and shared by every cell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from distill.cell.hashing import short_hash
from distill.rollouts.sampling import SAMPLING_KEYS, prompt_of, response_example, sample_examples
from distill.teachers.cache import build_once, examples_fingerprint, teacher_fingerprint

SEQ_KD_FORMAT = "1"


def seq_kd_key(teacher_path: str | Path, examples: Sequence[dict[str, Any]], cfg: Mapping[str, Any], *,
               max_length: int, eos_id: int, pad_id: int, cache_dir: str | Path | None = None) -> str:
    """Signature of everything the teacher's cached responses depend on."""
    knobs = {"sampling": {k: (cfg.get("sampling") or {}).get(k) for k in SAMPLING_KEYS}, "seed": cfg.get("seed"),
             "batch_size": cfg.get("batch_size"), "max_length": max_length, "eos": eos_id, "pad": pad_id}
    return short_hash("|".join([SEQ_KD_FORMAT, teacher_fingerprint(teacher_path, cache_dir),
                                examples_fingerprint(examples), json.dumps(knobs, sort_keys=True)]), 16)


def seq_kd_examples(cache_dir: Path, teacher_path: str | Path, examples: Sequence[dict[str, Any]],
                    cfg: Mapping[str, Any], *, load_teacher: Callable[[], torch.nn.Module], pad_id: int, eos_id: int,
                    max_length: int, progress: bool = False) -> list[dict[str, Any]]:
    """The training set with each reference replaced by one teacher sample for the same prompt.

    Sampled once per (teacher, training set, sampling settings, seed) into
    `<cache_dir>/seqkd-<key>.safetensors`, under a file lock (cells that start together wait for the
    first), written atomically; every cell of a grid reads the same file. `load_teacher` is called only
    when the file must be computed.
    """
    key = seq_kd_key(teacher_path, examples, cfg, max_length=max_length, eos_id=eos_id, pad_id=pad_id,
                     cache_dir=cache_dir)
    prompts = [prompt_of(e) for e in examples]

    def compute() -> dict[str, torch.Tensor]:
        teacher = load_teacher()
        made = sample_examples(teacher, prompts, sampling=cfg["sampling"], seed=int(cfg["seed"]), pad_id=pad_id,
                               eos_id=eos_id, max_length=max_length, batch_size=int(cfg["batch_size"]),
                               progress=progress)
        responses = [e["input_ids"][e["prompt_length"]:] for e in made]
        return {"tokens": torch.tensor([t for r in responses for t in r], dtype=torch.int64),
                "lengths": torch.tensor([len(r) for r in responses], dtype=torch.int64)}

    tensors = build_once(Path(cache_dir) / f"seqkd-{key}.safetensors", compute, {"key": key})
    lengths = tensors["lengths"].tolist()
    if len(lengths) != len(examples):
        raise ValueError(f"seq-KD cache {key} holds {len(lengths)} responses, expected {len(examples)}")
    tokens, out, start = tensors["tokens"].tolist(), [], 0
    for prompt, n in zip(prompts, lengths):
        out.append(response_example(prompt, tokens[start:start + n], eos_id=eos_id, max_length=max_length))
        start += n
    return out
