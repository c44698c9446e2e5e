"""Tests for distill/data.py: records, readers (every format on fixture files, hub path offline),
error messages, prompt templates, label masking, truncation, collation and `load_data`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distill import data
from distill.data import (
    ALPACA_PROMPT_INPUT,
    IGNORE_INDEX,
    Record,
    TrainDataset,
    TruncationStats,
    collate_train,
    encode_example,
    encode_prompts_left,
    load_data,
    load_hub_records,
    read_records,
    read_records_with_stats,
    render_prompt,
    split_valid,
    write_jsonl,
)
from distill.tasks import train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIX = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE with EOS, PAD and a chat template (the embedded recipe)."""
    text = [ALPACA_PROMPT_INPUT.format(instruction="Add 12 and 30.", input="12 30") + "The answer is 42."] * 20
    return train_tokenizer(text + ["the cat sat on the mat, 160 times\n"] * 20, 300)


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
    for fmt in data.FORMATS:
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


def test_write_jsonl_round_trips(tmp_path):
    recs = [REC, REC_NO_INPUT, Record("x", "y", ("z",), task="t")]
    write_jsonl(tmp_path / "out.jsonl", recs)
    assert read_records(tmp_path / "out.jsonl") == recs
    assert not list(tmp_path.glob("*.tmp*"))


def test_hub_loader_reads_a_local_dataset_dir_offline(tmp_path):
    recs = load_hub_records(str(FIX / "hub_dolly"), split="train", fmt="dolly", cache_dir=tmp_path)
    assert len(recs) == 5
    assert recs[:4] == read_records(FIX / "dolly.jsonl", "dolly")
    with pytest.raises(ValueError, match="unknown data format"):
        load_hub_records(str(FIX / "hub_dolly"), fmt="csv", cache_dir=tmp_path)


def test_split_valid_holds_out_the_first_lines():
    recs = [Record(str(i), "", ("o",)) for i in range(10)]
    train, valid = split_valid(recs, 3)
    assert [r.instruction for r in valid] == ["0", "1", "2"] and [r.instruction for r in train][0] == "3"
    with pytest.raises(ValueError, match="valid_size must be in 1..9"):
        split_valid(recs, 10)


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


def test_train_dataset_uses_the_seeded_paraphrase(tok):
    recs = [Record(f"Add {i} and 1.", "", (f"The answer is {i + 1}.", f"{i + 1}", f"It equals {i + 1}."))
            for i in range(12)]
    ds = TrainDataset(recs, tok, max_length=128, max_prompt_length=96, seed=3)
    assert len(ds) == 12 and ds.stats.examples == 12 and ds.stats.prompts_truncated == 0
    for r, ex in zip(recs, ds.examples):
        k = ex["prompt_length"]
        assert tok.decode(ex["input_ids"][k:-1]) == r.target(3)
    assert len({r.target_index(3) for r in recs}) > 1


# ----------------------------------------------------------------------------------------------
# load_data


def _external_cfg(**over):
    cfg = {
        "name": "dolly", "kind": "jsonl", "train_file": str(FIX / "dolly.jsonl"), "fmt": "dolly", "valid_size": 1,
        "test_size": None, "template": "alpaca", "max_length": 512, "max_prompt_length": 256,
        "benchmarks": ["selfinst", "uninst"],
        "benchmark_files": {"dolly": None, "selfinst": str(FIX / "selfinst.jsonl"),
                            "uninst": str(FIX / "uninst.jsonl")},
        "benchmark_limits": {"uninst": 2},
    }
    return {**cfg, **over}


def test_load_data_embedded_brings_splits_benchmarks_and_tokenizer(tmp_path):
    cfg = {"name": "embedded", "kind": "embedded", "tokenizer_vocab_size": 300, "template": "alpaca",
           "max_length": 192, "max_prompt_length": 160, "benchmarks": ["test", "shift_long"],
           "generator": {"seed": 3, "n_train": 44, "n_valid": 11, "n_test": 11, "n_shift": 11}}
    splits = load_data(cfg, tmp_path)
    assert (len(splits.train), len(splits.valid)) == (44, 11)
    assert list(splits.benchmarks) == ["test", "shift_long"] and all(len(v) == 11 for v in splits.benchmarks.values())
    assert splits.tokenizer_dir is not None and (splits.tokenizer_dir / "tokenizer.json").is_file()
    assert all(len(r.outputs) >= 2 and r.task for r in splits.train)
    with pytest.raises(ValueError, match="embedded suite has no benchmark 'dolly'"):
        load_data({**cfg, "benchmarks": ["dolly"]}, tmp_path)


def test_load_data_jsonl_valid_first_lines_benchmarks_and_limits(tmp_path, tok):
    splits = load_data(_external_cfg(), tmp_path, tokenizer=tok)
    dolly = read_records(FIX / "dolly.jsonl", "dolly")
    assert splits.valid == dolly[:1] and splits.train == dolly[1:] and splits.tokenizer_dir is None
    assert len(splits.benchmarks["selfinst"]) == 4 and len(splits.benchmarks["uninst"]) == 2
    assert splits.stats["train_dropped_overlap"] == 0 and splits.stats["train_prompts_over_max"] == 0


def test_load_data_holds_out_its_own_test_split_and_drops_overlap(tmp_path):
    # dolly test = the last record; a benchmark repeating a training record removes it from train
    lines = (FIX / "dolly.jsonl").read_text().splitlines()
    bench = tmp_path / "bench.jsonl"
    bench.write_text(lines[1] + "\n")
    cfg = _external_cfg(benchmarks=["dolly", "vicuna"], test_size=1, benchmark_files={"vicuna": str(bench)},
                        benchmark_formats={"vicuna": "dolly"})
    splits = load_data(cfg, tmp_path)
    dolly = read_records(FIX / "dolly.jsonl", "dolly")
    assert splits.benchmarks["dolly"] == dolly[-1:] and splits.valid == dolly[:1]
    assert splits.benchmarks["vicuna"] == dolly[1:2]
    assert splits.train == dolly[2:3] and splits.stats["train_dropped_overlap"] == 1


def test_load_data_hub_kind_reads_a_local_dataset_offline(tmp_path):
    cfg = _external_cfg(kind="hub", train_file=None, hub_id=str(FIX / "hub_dolly"), hub_cache_dir=str(tmp_path),
                        fmt=None, benchmarks=["dolly"], test_size=2, valid_size=1)
    splits = load_data(cfg, tmp_path)
    assert (len(splits.train), len(splits.valid), len(splits.benchmarks["dolly"])) == (2, 1, 2)


def test_load_data_config_errors(tmp_path):
    with pytest.raises(ValueError, match="benchmark 'sinst' has no file: set data.benchmark_files.sinst"):
        load_data(_external_cfg(benchmarks=["sinst"]), tmp_path)
    with pytest.raises(ValueError, match="unknown data.kind 'csv'"):
        load_data(_external_cfg(kind="csv"), tmp_path)
    with pytest.raises(ValueError, match="needs data.train_file"):
        load_data(_external_cfg(train_file=None), tmp_path)
    with pytest.raises(ValueError, match="set data.valid_size"):
        load_data(_external_cfg(valid_size=None), tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_data(_external_cfg(benchmark_files={"selfinst": str(tmp_path / "missing.jsonl"), "uninst": None},
                                benchmarks=["selfinst"]), tmp_path)


def test_load_data_accepts_the_composed_hydra_config(tmp_path):
    from tests.conftest import compose

    cfg = compose(["data.generator.n_train=22", "data.generator.n_valid=11", "data.generator.n_test=11",
                   "data.generator.n_shift=11", "data.tokenizer_vocab_size=300"])
    splits = load_data(cfg.data, tmp_path)
    assert set(splits.benchmarks) == set(cfg.data.benchmarks) and len(splits.train) == 22
    dolly = compose(["data=dolly"]).data
    assert dolly.kind == "hub" and dolly.benchmark_limits.uninst == 10000  # the contract keys exist


# ----------------------------------------------------------------------------------------------
# MiniLLM's released layout and split (item: "the Dolly split equals MiniLLM's")

MINILLM = FIX / "minillm_layout"


def minillm_process_data_dolly(raw_jsonl: Path, tokenizer, dev_num: int, max_prompt_length: int):
    """MiniLLM's split, transcribed from LMOps minillm/tools/process_data_dolly.py (the reference):
    read raw.jsonl lines; valid = lines[:dev_num], train = lines[dev_num:]; per line, render the
    Alpaca prompt, tokenize it without special tokens and drop the line when it has more than
    max_prompt_length tokens. Returns {split: [(instruction, input, output)]}."""
    lines = raw_jsonl.read_text().splitlines(keepends=True)
    out = {}
    for split, chunk in (("valid", lines[:dev_num]), ("train", lines[dev_num:])):
        kept = []
        for line in chunk:
            row = json.loads(line)
            if "input" not in row or len(row["input"]) == 0:
                prompt = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n").format(instruction=row["instruction"])
            else:
                prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
                          "context. Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n").format(
                    instruction=row["instruction"], input=row["input"])
            if len(tokenizer.encode(prompt, add_special_tokens=False)) > max_prompt_length:
                continue
            kept.append((row["instruction"], row["input"], row["output"]))
        out[split] = kept
    return out


def _minillm_cfg(**kw):
    from tests.conftest import compose

    cfg = compose(["data=dolly_minillm", f"data.dir={MINILLM}", *[f"data.{k}={v}" for k, v in kw.items()]]).data
    return cfg


def _triples(records):
    return [(r.instruction, r.input, r.outputs[0]) for r in records]


def test_minillm_layout_reads_dolly_and_the_four_other_eval_sets(tmp_path, tok):
    splits = load_data(_minillm_cfg(valid_size=5), tmp_path, tokenizer=tok)
    sizes = {name: len(recs) for name, recs in splits.benchmarks.items()}
    assert sizes == {"dolly": 6, "selfinst": 2, "vicuna": 2, "sinst": 2, "uninst": 3}
    # the test set is valid.jsonl (never part of raw.jsonl's train/dev pool), read with its `prompt` key ignored
    assert splits.benchmarks["dolly"][0].instruction == "What colour is the sky on a clear day?"
    assert splits.benchmarks["uninst"][1].outputs == ("mice",)


@pytest.mark.parametrize("max_prompt_length", [100, 256, 2000])
def test_dolly_split_equals_minillm_process_data_dolly(tmp_path, tok, max_prompt_length):
    cfg = _minillm_cfg(valid_size=5, max_prompt_length=max_prompt_length, max_length=max_prompt_length + 64)
    ours = load_data(cfg, tmp_path, tokenizer=tok)
    theirs = minillm_process_data_dolly(MINILLM / "dolly" / "raw.jsonl", tok, 5, max_prompt_length)
    assert _triples(ours.train) == theirs["train"] and _triples(ours.valid) == theirs["valid"]
    dropped = 28 - len(theirs["train"]) - len(theirs["valid"])
    assert ours.stats["train_prompts_over_max"] + ours.stats["valid_prompts_over_max"] == dropped
    if max_prompt_length <= 256:
        assert dropped > 0  # the fixture holds prompts over the limit: the rule is exercised


def test_long_prompt_policy_needs_a_tokenizer_and_a_known_value(tmp_path, tok):
    with pytest.raises(ValueError, match="long_prompts=drop counts prompt tokens"):
        load_data(_minillm_cfg(valid_size=5), tmp_path)
    with pytest.raises(ValueError, match="data.long_prompts='cut'"):
        load_data(_minillm_cfg(valid_size=5, long_prompts="cut"), tmp_path, tokenizer=tok)
    with pytest.raises(ValueError, match="left no training examples"):
        load_data(_minillm_cfg(valid_size=5, max_prompt_length=3, max_length=64), tmp_path, tokenizer=tok)


def test_truncate_policy_keeps_long_prompts_and_counts_them(tmp_path, tok):
    """data=dolly's default keeps every long prompt (truncated at encode time), only counting them."""
    cfg = _minillm_cfg(valid_size=5, max_prompt_length=100, long_prompts="truncate", drop_overlap=True)
    splits = load_data(cfg, tmp_path, tokenizer=tok)
    assert len(splits.train) == 23 and splits.stats["train_prompts_over_max"] > 0


def test_qwen_template_is_minillms_wrapped_alpaca():
    text = render_prompt(REC_NO_INPUT, "alpaca_qwen")
    assert text == "<|im_start|>" + render_prompt(REC_NO_INPUT, "alpaca") + "<|im_end|><|im_start|>Assistant:"
