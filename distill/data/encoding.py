"""Prompt templates, encoding with label masks, collation: records -> the tensors a step trains on.

Prompt truncation (documented choice): prompts longer than ``max_prompt_length`` keep their END
(``truncation_side="left"``, the default) so the "### Response:" marker stays next to the response
the model must produce. Anchors differ: MiniLLM drops such training examples and cuts eval prompts
to their first tokens; DistiLLM keeps the first tokens. ``truncation_side="right"`` gives the
DistiLLM behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distill.data.records import Record
from distill.options import TEMPLATES, TRUNCATION_SIDES

IGNORE_INDEX = -100  # label value ignored by the loss (HF / torch cross-entropy convention)

# The Alpaca-style prompts used by MiniLLM / DistiLLM (the anchors' eval protocol).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# The Alpaca structure without its preamble sentence: the preamble is ~37 of ~75 tokens per embedded
# example under the 512-token BPE, so dropping it halves the demo's compute without changing the task.
COMPACT_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
COMPACT_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
# MiniLLM's Qwen2 variant (minillm/tools/process_data_dolly.py, model_type qwen2): the Alpaca text in
# ChatML-like markers, with an "Assistant:" turn after it.
QWEN_WRAP = "<|im_start|>{prompt}<|im_end|><|im_start|>Assistant:"


def render_prompt(record: Record, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text the model sees before the response.

    ``alpaca``: MiniLLM/DistiLLM's Alpaca-style template (with or without the Input block).
    ``alpaca_compact``: the same blocks without the preamble sentence (the embedded demo's choice).
    ``alpaca_qwen``: the Alpaca text wrapped as MiniLLM does for Qwen2/2.5 (`QWEN_WRAP`).
    ``chat``: the tokenizer's chat template, one user turn (instruction, blank line, input),
    with the generation prompt appended.
    """
    if template == "alpaca":
        if record.input:
            return ALPACA_PROMPT_INPUT.format(instruction=record.instruction, input=record.input)
        return ALPACA_PROMPT.format(instruction=record.instruction)
    if template == "alpaca_qwen":
        return QWEN_WRAP.format(prompt=render_prompt(record, "alpaca"))
    if template == "alpaca_compact":
        if record.input:
            return COMPACT_PROMPT_INPUT.format(instruction=record.instruction, input=record.input)
        return COMPACT_PROMPT.format(instruction=record.instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat_template; use template='alpaca' otherwise")
        content = record.instruction + (f"\n\n{record.input}" if record.input else "")
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt template {template!r}; allowed: {', '.join(TEMPLATES)}")


@dataclass
class TruncationStats:
    """Counters of what `encode_example` cut; log them once per dataset."""

    examples: int = 0
    prompts_truncated: int = 0
    prompt_tokens_dropped: int = 0
    responses_truncated: int = 0  # the response (and its EOS) did not fit in max_length
    response_tokens_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _truncate(ids: list[int], max_len: int, side: str) -> list[int]:
    if len(ids) <= max_len:
        return ids
    return ids[len(ids) - max_len:] if side == "left" else ids[:max_len]


def _check_lengths(max_length: int, max_prompt_length: int, side: str) -> None:
    if side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {side!r}")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; training needs one to end responses")
    return tokenizer.eos_token_id


def encode_example(tokenizer: Any, record: Record, *, template: str = "alpaca", max_length: int = 512,
                   max_prompt_length: int = 256, target_index: int = 0, truncation_side: str = "left",
                   stats: TruncationStats | None = None) -> dict[str, list[int]]:
    """Tokenize prompt + chosen reference + EOS for teacher-forced training.

    Returns ``input_ids`` and ``labels`` (same length; labels are IGNORE_INDEX on prompt tokens and
    equal to input_ids on response + EOS; HF causal LMs shift them internally) and ``prompt_length``.
    ``target_index`` picks the reference, modulo the number of references (so a rotating index or
    ``record.target_index(seed)`` both work). The prompt and the response are tokenized separately,
    exactly as the prompt is tokenized at
    generation time. The prompt is cut to ``max_prompt_length`` (``truncation_side``, see module
    docstring), then the response is cut so the whole fits ``max_length`` (EOS lost if cut).
    """
    _check_lengths(max_length, max_prompt_length, truncation_side)
    if not isinstance(target_index, int):
        raise ValueError(f"target_index must be an int, got {target_index!r}")
    prompt = tokenizer.encode(render_prompt(record, template, tokenizer), add_special_tokens=False)
    target = record.outputs[target_index % len(record.outputs)]
    response = tokenizer.encode(target, add_special_tokens=False) + [_eos_id(tokenizer)]
    cut_prompt = _truncate(prompt, max_prompt_length, truncation_side)
    cut_response = response[: max_length - len(cut_prompt)]
    if stats is not None:
        stats.examples += 1
        stats.prompts_truncated += len(cut_prompt) < len(prompt)
        stats.prompt_tokens_dropped += len(prompt) - len(cut_prompt)
        stats.responses_truncated += len(cut_response) < len(response)
        stats.response_tokens_dropped += len(response) - len(cut_response)
    return {
        "input_ids": cut_prompt + cut_response,
        "labels": [IGNORE_INDEX] * len(cut_prompt) + cut_response,
        "prompt_length": len(cut_prompt),
    }


def encode_records(tokenizer: Any, records: Sequence[Record], data_cfg: Any,
                   stats: TruncationStats | None = None) -> list[dict[str, list[int]]]:
    """Encode records for teacher-forced training as the job does, from a ``conf/data`` config.

    Template, ``max_length``, ``max_prompt_length`` and ``truncation_side`` come from ``data_cfg``;
    the target paraphrase is fixed per example by ``data.target_seed`` (not by the training seed),
    so every cell of a grid teacher-forces the same sequences and can share one teacher cache.
    """
    target_seed = int(data_cfg.get("target_seed", 0))
    return [
        encode_example(tokenizer, r, template=data_cfg.get("template", "alpaca"),
                       max_length=int(data_cfg.get("max_length", 512)),
                       max_prompt_length=int(data_cfg.get("max_prompt_length", 256)),
                       target_index=r.target_index(target_seed),
                       truncation_side=data_cfg.get("truncation_side", "left"), stats=stats)
        for r in records
    ]


def collate_train(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: input_ids, attention_mask, labels (IGNORE_INDEX on pads)."""
    if not examples:
        raise ValueError("collate_train got an empty batch")
    n = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        if len(e["labels"]) != k:
            raise ValueError(f"example {i}: input_ids has {k} tokens but labels has {len(e['labels'])}")
        input_ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.tensor(e["labels"], dtype=torch.long)
        attention_mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B, T-1]: logits[:, t] predict labels[:, t+1], so position t is scored when labels[:, t+1] is a
    response token (not IGNORE_INDEX). The causal shift, in one place for the losses, validation, the teacher
    cache and the analysis."""
    return labels[:, 1:] != IGNORE_INDEX


def encode_prompts_left(tokenizer: Any, prompts: Sequence[str], max_prompt_length: int,
                        truncation_side: str = "left") -> dict[str, torch.Tensor]:
    """Tokenize rendered prompts, truncate like training does, and LEFT-pad for batched generation."""
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    if not prompts:
        raise ValueError("encode_prompts_left got no prompts")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    ids = [_truncate(tokenizer.encode(p, add_special_tokens=False), max_prompt_length, truncation_side)
           for p in prompts]
    return left_pad(ids, pad_id)


def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """LEFT-pad token id lists to the longest: input_ids and attention_mask (0 on pads), for generation."""
    if not ids:
        raise ValueError("left_pad got no sequences")
    n = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), n), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        if len(x):
            input_ids[i, n - len(x):] = torch.as_tensor(list(x), dtype=torch.long)
            attention_mask[i, n - len(x):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
