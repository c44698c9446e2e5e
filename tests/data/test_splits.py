"""Tests for distill/data/splits.py: the data config -> train / valid / benchmark records (embedded, JSONL files,
the Hub path offline), held-out splits, overlap removal and config errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distill.data.records import Record, read_records
from distill.data.splits import load_data, split_valid
from tests.conftest import compose

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def test_split_valid_holds_out_the_first_lines():
    recs = [Record(str(i), "", ("o",)) for i in range(10)]
    train, valid = split_valid(recs, 3)
    assert [r.instruction for r in valid] == ["0", "1", "2"] and [r.instruction for r in train][0] == "3"
    with pytest.raises(ValueError, match="valid_size must be in 1..9"):
        split_valid(recs, 10)


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


def test_load_data_jsonl_valid_first_lines_benchmarks_and_limits(tmp_path, alpaca_tokenizer):
    splits = load_data(_external_cfg(), tmp_path, tokenizer=alpaca_tokenizer)
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
    cfg = compose(["data.generator.n_train=22", "data.generator.n_valid=11", "data.generator.n_test=11",
                   "data.generator.n_shift=11", "data.tokenizer_vocab_size=300"])
    splits = load_data(cfg.data, tmp_path)
    assert set(splits.benchmarks) == set(cfg.data.benchmarks) and len(splits.train) == 22
    dolly = compose(["data=dolly"]).data
    assert dolly.kind == "hub" and dolly.benchmark_limits.uninst == 10000  # the contract keys exist


@pytest.fixture
def tok(alpaca_tokenizer):
    return alpaca_tokenizer


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

