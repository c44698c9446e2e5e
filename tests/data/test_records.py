"""distill/data/records.py: records and readers (every format on fixture files, the hub path offline), error messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distill.options import DATA_FORMATS
from distill.data.records import Record, load_hub_records, read_records, read_records_with_stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"


REC = Record("Add the numbers.", "12 and 30", ("The answer is 42.", "42", "It equals 42."))
REC_NO_INPUT = Record("Name a colour.", "", ("Blue.",))


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
