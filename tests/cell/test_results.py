"""distill.cell.results as the report and the evaluation read it: a checked metrics.json and the generations."""

import json

import pytest

from distill.cell.results import GENERATIONS_SUFFIX, load_metrics, parse_metrics, read_generations

GOOD = {"schema_version": 1, "status": "completed", "cell": {"divergence": "fkl", "tau": 1.0, "seed": 0},
        "eval": {"test": {"rougeL_mean": 40.0}}}


def test_parse_metrics_accepts_a_recorded_cell_and_says_what_is_wrong_otherwise():
    assert parse_metrics(json.dumps(GOOD), "c/metrics.json") == GOOD
    bad = {"{not json": "not valid JSON", "[]": "expected a JSON object",
           json.dumps({**GOOD, "schema_version": 0}): "schema_version 0",
           json.dumps({**GOOD, "status": "done"}): "status 'done'",
           json.dumps({**GOOD, "cell": {"tau": 1.0}}): "at least divergence, tau and seed",
           json.dumps({k: v for k, v in GOOD.items() if k != "eval"}): "without an 'eval' object"}
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_metrics(text, "c/metrics.json")


def test_load_metrics_names_the_file(tmp_path):
    (tmp_path / "metrics.json").write_text("{")
    with pytest.raises(ValueError, match=r"^cell-1/metrics.json: not valid JSON"):
        load_metrics(tmp_path, "cell-1/metrics.json")
    with pytest.raises(OSError):
        load_metrics(tmp_path / "nowhere")


def test_read_generations_skips_a_torn_line_and_a_missing_file_is_empty(tmp_path):
    line = {"seed": 10, "prompt": "p", "output": "o", "references": ["r"], "rougeL": 50.0}
    (tmp_path / f"test{GENERATIONS_SUFFIX}").write_text(json.dumps(line) + "\n" + '{"seed": 1')
    assert read_generations(tmp_path, "test") == [line]
    assert read_generations(tmp_path, "other") == []
