"""Tests for distill/splits.py: the data config -> train / valid / benchmark records (embedded, JSONL files,
the Hub path offline), held-out splits, overlap removal and config errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distill.data import Record, read_records
from distill.splits import load_data, split_valid
from tests.conftest import compose

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIX = Path(__file__).resolve().parent / "fixtures" / "data"


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
