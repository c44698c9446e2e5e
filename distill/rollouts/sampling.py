"""Sampled responses as training examples, and the seeds and coins that make them reproducible.

Every draw is a function of its arguments: seeds and coins are derived from (training seed, step, micro-batch[,
rank]), never from a running RNG, so a resumed cell makes exactly the draws an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterable, Mapping, Sequence

import torch

from distill.data.encoding import IGNORE_INDEX, left_pad
from distill.evaluation.generate import sample_new_tokens, seeded

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "no_repeat_ngram_size")


# ------------------------------------------------------------------------------------------ seeds

def derived_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of `parts` (e.g. purpose, training seed, step, micro, rank)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def coin(*parts: Any) -> float:
    """A uniform draw in [0, 1) that depends on `parts` only."""
    return random.Random(derived_seed(*parts)).random()


# ------------------------------------------------------------------------------------------ sampling

def response_example(prompt: Sequence[int], new_tokens: Sequence[int], *, eos_id: int,
                     max_length: int) -> dict[str, Any]:
    """A generated response as a training example (the shape of `data.encode_example`'s).

    The response is cut right after its first EOS (kept: the model must learn to stop, and it is counted
    once; everything after it, HF's padding included, is dropped), then capped so that prompt + response
    fits `max_length`. Labels are -100 on the prompt and equal the tokens on the response.
    """
    response = [int(t) for t in new_tokens]
    if eos_id in response:
        response = response[: response.index(eos_id) + 1]
    response = response[: max(0, max_length - len(prompt))]
    return {"input_ids": [int(t) for t in prompt] + response,
            "labels": [IGNORE_INDEX] * len(prompt) + response, "prompt_length": len(prompt)}


def sample_examples(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, sampling: Mapping[str, Any],
                    seed: int, pad_id: int, eos_id: int, max_length: int, batch_size: int | None = None,
                    synced_gpus: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """Sample one response per prompt (token ids) from `model` and return them as training examples.

    Batched, left-padded, KV-cached generation that stops once every row has emitted EOS
    (`distill.evaluation.generate.sample_new_tokens`), seeded by `seed` without touching the caller's RNG. Each
    batch may add `sampling.max_new_tokens` tokens, or when null `max_length - padded prompt length`.
    `sampling.temperature` is the SAMPLING temperature, not the loss's tau. `synced_gpus` must be set
    when the model's forwards are collective (ZeRO-3 with more than one rank).
    """
    if not prompts:
        raise ValueError("sample_examples got no prompts")
    batch_size = batch_size or len(prompts)
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    starts: Iterable[int] = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sample", unit="batch")
    with seeded(seed, device):
        for start in starts:
            chunk = prompts[start:start + batch_size]
            enc = left_pad(chunk, pad_id)
            n_new = sampling.get("max_new_tokens") or max(1, max_length - enc["input_ids"].shape[1])
            new = sample_new_tokens(
                model, enc["input_ids"].to(device), enc["attention_mask"].to(device), max_new_tokens=int(n_new),
                eos_token_id=eos_id, pad_token_id=pad_id, do_sample=True, top_k=int(sampling.get("top_k", 0)),
                top_p=float(sampling.get("top_p", 1.0)), temperature=float(sampling.get("temperature", 1.0)),
                no_repeat_ngram_size=int(sampling.get("no_repeat_ngram_size") or 0), synced_gpus=synced_gpus,
            )
            out.extend(response_example(p, row, eos_id=eos_id, max_length=max_length)
                       for p, row in zip(chunk, new.tolist()))
    return out


def prompt_of(example: Mapping[str, Any]) -> list[int]:
    """The prompt tokens of an encoded example."""
    return list(example["input_ids"][: example["prompt_length"]])
