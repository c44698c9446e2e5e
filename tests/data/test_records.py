"""Tests for distill/data.py: records, readers (every format on fixture files, hub path offline),
error messages, prompt templates, label masking, truncation, collation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distill.options import DATA_FORMATS
from distill.data import records as data
from distill.data.records import (
    IGNORE_INDEX,
    Record,
    TruncationStats,
    collate_train,
    encode_example,
    encode_prompts_left,
    load_hub_records,
    read_records,
    read_records_with_stats,
    render_prompt,
)

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


def test_record_needs_non_empty_string_references():
    with pytest.raises(ValueError, match=">= 1 non-empty string"):
        Record("x", "", ())
    with pytest.raises(ValueError, match=">= 1 non-empty string"):
        Record("x", "", ("ok", ""))
    with pytest.raises(ValueError, match="tuple of strings"):
        Record("x", "", "just a string")  # type: ignore[arg-type]


def test_target_index_is_stable_in_range_and_varies_across_records():
    recs = [Record(f"Add {i} and 1.", "", ("a", "b", "c")) for i in range(300)]
    picks = [r.target_index(0) for r in recs]
    assert picks == [r.target_index(0) for r in recs] and set(picks) == {0, 1, 2}
    assert min(picks.count(k) for k in range(3)) > 60  # roughly uniform
    assert [r.target_index(1) for r in recs] != picks  # the seed matters
    assert REC_NO_INPUT.target_index(5) == 0
    assert REC.target(3) == REC.outputs[REC.target_index(3)]


# ----------------------------------------------------------------------------------------------
# readers and errors


def test_jsonl_reader_minillm_schema_and_skipped_empty_reference():
    recs, counts = read_records_with_stats(FIX / "minillm.jsonl", "jsonl")
    assert len(recs) == 4  # the blank line is ignored
    assert recs[0] == Record("Give three tips for keeping a houseplant alive.", "", (
        "Water it only when the top soil is dry, put it near bright indirect light, "
        "and repot it when the roots fill the pot.",))
    assert len(recs[1].outputs) == 2 and recs[1].input.startswith("The town library")
    assert recs[3].outputs == ("Ottawa is the capital of Canada.", "Ottawa")
    assert counts["empty_references"] == 1 and counts["records_without_reference"] == 0


def test_dolly_reader_maps_context_and_response():
    recs = read_records(FIX / "dolly.jsonl", "dolly")
    assert len(recs) == 4
    assert recs[0].input.startswith("The north cape lighthouse")
    assert recs[0].outputs[0].startswith("The lighthouse was first lit")
    assert recs[0].task == "closed_qa"
    assert recs[1].input == ""


def test_selfinst_reader_expands_instances():
    recs = read_records(FIX / "selfinst.jsonl", "selfinst")
    assert len(recs) == 4  # 1 + 1 + 2 instances
    assert recs[2].instruction == recs[3].instruction == "Suggest a quick snack that uses the given ingredients."
    assert (recs[2].input, recs[3].input) == ("apples, peanut butter, oats", "yogurt, honey, walnuts")


def test_vicuna_reader_reads_fastchat_questions_with_references_and_minillm_dirs():
    recs = read_records(FIX / "vicuna.jsonl", "vicuna")
    assert [r.instruction for r in recs][:2] == [
        "How can I improve my time management skills?", "What are the main differences between a lake and a pond?"]
    assert recs[1].outputs[0].startswith("Lakes are usually larger")
    released = read_records(FIX / "minillm_vicuna", "vicuna")  # a MiniLLM data dir: valid.jsonl inside
    assert [r.instruction for r in released] == [r.instruction for r in recs]


def test_vicuna_question_without_reference_is_a_clear_error(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": 1, "text": "Hi?", "category": "generic"}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: vicuna question has no 'reference'"):
        read_records(f, "vicuna")


def test_sinst_reader_reads_task_files_and_skips_empty_reference():
    recs, counts = read_records_with_stats(FIX / "sinst_tasks", "sinst")
    assert len(recs) == 5 and counts["empty_references"] == 1
    assert recs[0].instruction.startswith("In this task, you are given a sentence.")
    assert recs[0].input == "a small boat crossed the bay" and recs[0].outputs == ("bay the crossed boat small a",)
    one = read_records(FIX / "sinst_tasks" / "task202_sentiment.json", "sinst")
    assert [r.outputs for r in one] == [("positive",), ("negative",)]


def test_uninst_reader_uses_instruction_and_input_and_fills_placeholders():
    recs = read_records(FIX / "uninst.jsonl", "uninst")
    assert len(recs) == 4
    assert recs[0].input == "Ingredients: carrot, spinach, salmon, leek" and recs[0].outputs == ("salmon",)
    assert recs[1].instruction == "In this task, you need to count the vowels in the word 'banana'."
    assert recs[1].input == ""
    assert all("{INPUT}" not in r.instruction for r in recs)


def test_every_format_accepts_the_minillm_release_schema():
    for fmt in DATA_FORMATS:
        assert len(read_records(FIX / "minillm.jsonl", fmt)) == 4, fmt


@pytest.mark.parametrize(
    ("lines", "fmt", "match"),
    [
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": "b"'], "jsonl",
         r"bad.jsonl:2: invalid JSON"),
        (['{"instruction": "a", "output": "b"}', "", '{"instruction": "a"}'], "jsonl",
         r"bad.jsonl:3: missing field 'output'"),
        (['{"input": "a", "output": "b"}'], "jsonl", r"bad.jsonl:1: missing field 'instruction'"),
        (['{"instruction": "a", "output": 3}'], "jsonl", r"bad.jsonl:1: field 'output' must be a string or a list"),
        (['{"instruction": 1, "output": "b"}'], "jsonl", r"bad.jsonl:1: field 'instruction' must be a string"),
        (['{"instruction": " ", "output": "b"}'], "jsonl", r"bad.jsonl:1: empty 'instruction'"),
        (['["a", "b"]'], "jsonl", r"bad.jsonl:1: expected a JSON object"),
        (['{"instruction": "a", "context": ""}'], "dolly", r"bad.jsonl:1: missing field 'output' \(format 'dolly'"),
    ],
)
def test_malformed_lines_name_file_line_and_problem(tmp_path, lines, fmt, match):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        read_records(f, fmt)


@pytest.mark.parametrize("name", ["bad.jsonl", "task001_bad.json"])
def test_non_utf8_bytes_are_reported_with_file_and_line(tmp_path, name):
    f = tmp_path / name
    good = '{"instruction": "a", "output": "b"}'
    if name.endswith(".jsonl"):
        f.write_bytes(f"{good}\n{good}\n".encode() + b'{"instruction": "caf\xe9", "output": "b"}\n')
        fmt = "jsonl"
    else:
        f.write_bytes(b'{"Definition": "d",\n "Instances": [{"input": "\xff", "output": ["x"]}]}\n')
        fmt = "sinst"
    with pytest.raises(ValueError, match=rf"{name}:(3|2): not UTF-8 \(byte 0x(e9|ff) at column \d+\): re-encode"):
        read_records(f, fmt)


def test_empty_dataset_and_all_empty_references_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no usable records"):
        read_records(empty)
    f = tmp_path / "refs.jsonl"
    f.write_text('{"instruction": "a", "output": ""}\n{"instruction": "b", "output": ["", " "]}\n')
    with pytest.raises(ValueError, match="skipped 2 without a reference"):
        read_records(f)
    f.write_text('{"instruction": "a", "output": ""}\n{"instruction": "b", "output": "ok"}\n')
    recs, counts = read_records_with_stats(f)
    assert [r.instruction for r in recs] == ["b"] and counts["records_without_reference"] == 1


def test_unknown_format_and_missing_path_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'alpaca'"):
        read_records(FIX / "minillm.jsonl", "alpaca")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="without valid.jsonl"):
        read_records(tmp_path)


def test_hub_loader_reads_a_local_dataset_dir_offline(tmp_path):
    recs = load_hub_records(str(FIX / "hub_dolly"), split="train", fmt="dolly", cache_dir=tmp_path)
    assert len(recs) == 5
    assert recs[:4] == read_records(FIX / "dolly.jsonl", "dolly")
    with pytest.raises(ValueError, match="unknown data format"):
        load_hub_records(str(FIX / "hub_dolly"), fmt="csv", cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# templates


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
    mask = data.response_mask(labels)
    # logits at t predict labels at t + 1: position t is scored when labels[t + 1] is a response token
    assert mask.tolist() == [[False, True, True, False], [True, True, True, True]]
    batch = collate_train([{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [1], "labels": [1]}], 0)
    assert data.response_mask(batch["labels"]).sum() == 2  # padding is never scored


def test_encode_records_follows_the_data_config(tok):
    recs = [Record(f"Add {i} and 1.", "", (f"The answer is {i + 1}.", f"{i + 1}", f"It equals {i + 1}."))
            for i in range(12)]
    cfg = {"template": "alpaca", "max_length": 128, "max_prompt_length": 96, "target_seed": 3}
    stats = TruncationStats()
    examples = data.encode_records(tok, recs, cfg, stats)
    assert len(examples) == 12 and stats.examples == 12 and stats.prompts_truncated == 0
    for r, ex in zip(recs, examples):  # the paraphrase is fixed by data.target_seed
        k = ex["prompt_length"]
        assert tok.decode(ex["input_ids"][k:-1]) == r.target(3)
    assert len({r.target_index(3) for r in recs}) > 1
    # data.truncation_side reaches the encoder: "right" keeps a long prompt's start, "left" its end.
    long = [Record("word " * 80, "", ("ok",))]
    short = {**cfg, "max_length": 40, "max_prompt_length": 16}
    left = data.encode_records(tok, long, {**short, "truncation_side": "left"})[0]
    right = data.encode_records(tok, long, {**short, "truncation_side": "right"})[0]
    prompt = ids(tok, render_prompt(long[0], "alpaca"))
    assert left["input_ids"][:16] == prompt[-16:] and right["input_ids"][:16] == prompt[:16]


def test_qwen_template_is_minillms_wrapped_alpaca():
    text = render_prompt(REC_NO_INPUT, "alpaca_qwen")
    assert text == "<|im_start|>" + render_prompt(REC_NO_INPUT, "alpaca") + "<|im_end|><|im_start|>Assistant:"
