"""distill/data/encoding.py: prompt templates, label masking, truncation, collation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distill.data import encoding
from distill.data.records import Record
from distill.data.encoding import IGNORE_INDEX, TruncationStats, collate_train, encode_example, encode_prompts_left, render_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture
def tok(alpaca_tokenizer):
    return alpaca_tokenizer


REC = Record("Add the numbers.", "12 and 30", ("The answer is 42.", "42", "It equals 42."))
REC_NO_INPUT = Record("Name a colour.", "", ("Blue.",))


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------------------------
# Record


def test_alpaca_template_with_and_without_input():
    assert render_prompt(REC) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n12 and 30\n\n### Response:\n"
    )
    assert render_prompt(REC_NO_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Response:\n"
    )


def test_compact_template_keeps_the_alpaca_blocks_without_the_preamble():
    assert render_prompt(REC, "alpaca_compact") == "### Instruction:\nAdd the numbers.\n\n### Input:\n12 and 30\n\n### Response:\n"
    assert render_prompt(REC_NO_INPUT, "alpaca_compact") == "### Instruction:\nName a colour.\n\n### Response:\n"
    assert render_prompt(REC).endswith(render_prompt(REC, "alpaca_compact"))


def test_chat_template_uses_the_tokenizer(tok):
    p = render_prompt(REC, "chat", tok)
    assert p == "<|user|>\nAdd the numbers.\n\n12 and 30\n<|assistant|>\n"
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        render_prompt(REC, "chat")
    with pytest.raises(ValueError, match="unknown prompt template 'vicuna'"):
        render_prompt(REC, "vicuna")


# ----------------------------------------------------------------------------------------------
# encoding, truncation, collation


@pytest.mark.parametrize("record", [REC, REC_NO_INPUT])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_labels_mask_the_prompt_and_count_response_plus_eos(tok, record, k):
    ex = encode_example(tok, record, template="alpaca", target_index=k)
    prompt, target = ids(tok, render_prompt(record)), record.outputs[k % len(record.outputs)]
    response = ids(tok, target) + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + response and ex["prompt_length"] == len(prompt)
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert sum(label != IGNORE_INDEX for label in ex["labels"]) == len(ids(tok, target)) + 1
    assert tok.decode(ex["input_ids"][len(prompt):-1]) == target


def test_prompt_truncation_keeps_the_end_by_default_and_the_start_on_request(tok):
    long_rec = Record("Add the numbers. " * 30, "12 and 30", ("42",))
    prompt = ids(tok, render_prompt(long_rec))
    stats = TruncationStats()
    left = encode_example(tok, long_rec, max_length=64, max_prompt_length=32, stats=stats)
    assert left["input_ids"][:32] == prompt[-32:]  # "### Response:" survives next to the answer
    assert left["labels"][32:] == ids(tok, "42") + [tok.eos_token_id]
    right = encode_example(tok, long_rec, max_length=64, max_prompt_length=32, truncation_side="right", stats=stats)
    assert right["input_ids"][:32] == prompt[:32]
    assert stats.as_dict() == {"examples": 2, "prompts_truncated": 2, "prompt_tokens_dropped": 2 * (len(prompt) - 32),
                               "responses_truncated": 0, "response_tokens_dropped": 0}


def test_response_is_cut_to_max_length_and_loses_eos(tok):
    rec = Record("Say it.", "", ("the cat sat on the mat " * 10,))
    stats = TruncationStats()
    n_prompt = len(ids(tok, render_prompt(rec)))
    ex = encode_example(tok, rec, max_length=n_prompt + 20, max_prompt_length=n_prompt, stats=stats)
    assert len(ex["input_ids"]) == len(ex["labels"]) == n_prompt + 20
    assert ex["labels"][n_prompt:] == ids(tok, rec.outputs[0])[:20]  # EOS lost
    assert stats.prompts_truncated == 0 and stats.responses_truncated == 1
    assert stats.response_tokens_dropped == len(ids(tok, rec.outputs[0])) + 1 - 20


def test_encode_rejects_bad_lengths_and_side(tok):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        encode_example(tok, REC, max_length=32, max_prompt_length=32)
    with pytest.raises(ValueError, match="truncation_side must be one of"):
        encode_example(tok, REC, truncation_side="middle")


def test_collate_train_right_pads_with_masked_labels(tok):
    exs = [encode_example(tok, REC, target_index=k) for k in range(3)]
    pad = tok.pad_token_id
    batch = collate_train(exs, pad)
    n = max(len(e["input_ids"]) for e in exs)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tuple(v.shape) == (3, n) for v in batch.values())
    for i, e in enumerate(exs):
        k = len(e["input_ids"])
        assert batch["input_ids"][i, :k].tolist() == e["input_ids"] and (batch["input_ids"][i, k:] == pad).all()
        assert batch["attention_mask"][i].tolist() == [1] * k + [0] * (n - k)
        assert batch["labels"][i, :k].tolist() == e["labels"] and (batch["labels"][i, k:] == IGNORE_INDEX).all()
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="empty batch"):
        collate_train([], pad)
    with pytest.raises(ValueError, match="example 0: input_ids has 2 tokens but labels has 1"):
        collate_train([{"input_ids": [1, 2], "labels": [1]}], pad)


def test_encode_prompts_left_pads_on_the_left_and_truncates(tok):
    prompts = [render_prompt(REC), render_prompt(REC_NO_INPUT), "short"]
    enc = encode_prompts_left(tok, prompts, max_prompt_length=48)
    lens = [min(len(ids(tok, p)), 48) for p in prompts]
    n = max(lens)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (3, n)
    for i, (p, k) in enumerate(zip(prompts, lens)):
        assert enc["input_ids"][i, n - k:].tolist() == ids(tok, p)[-k:]  # keeps the END, like training
        assert enc["attention_mask"][i].tolist() == [0] * (n - k) + [1] * k
        assert (enc["input_ids"][i, : n - k] == tok.pad_token_id).all()
    assert enc["attention_mask"][:, -1].all()  # every row ends with a real token: generation continues it
    with pytest.raises(ValueError, match="got no prompts"):
        encode_prompts_left(tok, [], 8)


def test_response_mask_is_the_causal_shift_of_the_labels():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX], [IGNORE_INDEX, 5, 6, 9, 2]])
    mask = encoding.response_mask(labels)
    # logits at t predict labels at t + 1: position t is scored when labels[t + 1] is a response token
    assert mask.tolist() == [[False, True, True, False], [True, True, True, True]]
    batch = collate_train([{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [1], "labels": [1]}], 0)
    assert encoding.response_mask(batch["labels"]).sum() == 2  # padding is never scored


def test_encode_records_follows_the_data_config(tok):
    recs = [Record(f"Add {i} and 1.", "", (f"The answer is {i + 1}.", f"{i + 1}", f"It equals {i + 1}."))
            for i in range(12)]
    cfg = {"template": "alpaca", "max_length": 128, "max_prompt_length": 96, "target_seed": 3}
    stats = TruncationStats()
    examples = encoding.encode_records(tok, recs, cfg, stats)
    assert len(examples) == 12 and stats.examples == 12 and stats.prompts_truncated == 0
    for r, ex in zip(recs, examples):  # the paraphrase is fixed by data.target_seed
        k = ex["prompt_length"]
        assert tok.decode(ex["input_ids"][k:-1]) == r.target(3)
    assert len({r.target_index(3) for r in recs}) > 1
    # data.truncation_side reaches the encoder: "right" keeps a long prompt's start, "left" its end.
    long = [Record("word " * 80, "", ("ok",))]
    short = {**cfg, "max_length": 40, "max_prompt_length": 16}
    left = encoding.encode_records(tok, long, {**short, "truncation_side": "left"})[0]
    right = encoding.encode_records(tok, long, {**short, "truncation_side": "right"})[0]
    prompt = ids(tok, render_prompt(long[0], "alpaca"))
    assert left["input_ids"][:16] == prompt[-16:] and right["input_ids"][:16] == prompt[:16]


def test_qwen_template_is_minillms_wrapped_alpaca():
    text = render_prompt(REC_NO_INPUT, "alpaca_qwen")
    assert text == "<|im_start|>" + render_prompt(REC_NO_INPUT, "alpaca") + "<|im_end|><|im_start|>Assistant:"
