"""Tests for distill/data/embedded.py: the generated suite (determinism, paraphrases, disjoint and shifted
splits), the local tokenizer (exact round trip, digits), and the cached `prepare_embedded` dir."""

from __future__ import annotations

import json
import multiprocessing
import re
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from distill.data import embedded as tasks
from distill.data.task_families import FAMILIES
from distill.data.records import read_records
from distill.data.encoding import render_prompt

CONF = Path(__file__).resolve().parents[2] / "conf" / "data" / "embedded.yaml"
SMALL = {"seed": 7, "n_train": 330, "n_valid": 33, "n_test": 44, "n_shift": 44}


def small_cfg(**gen):
    return {"generator": {**SMALL, **gen}, "tokenizer_vocab_size": 320}


@pytest.fixture(scope="module")
def suite():
    return tasks.generate_suite(SMALL)


@pytest.fixture(scope="module")
def default_suite_dir(tmp_path_factory):
    """The suite exactly as conf/data/embedded.yaml configures it (a few seconds to build)."""
    cfg = OmegaConf.load(CONF)
    return tasks.prepare_embedded(cfg, tmp_path_factory.mktemp("default")), cfg


def _phrasing_regex(phrasing: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", phrasing)
    return re.compile("^" + "(.+)".join(re.escape(p) for p in parts) + "$")


def _matches_any(instruction: str, phrasings) -> bool:
    return any(_phrasing_regex(p).match(instruction) for p in phrasings)


# ----------------------------------------------------------------------------------------------
# generator


def test_generation_is_deterministic_and_seed_dependent(suite):
    again = tasks.generate_suite(SMALL)
    assert again == suite
    other = tasks.generate_suite({**SMALL, "seed": 8})
    assert [e.record for e in other["train"]] != [e.record for e in suite["train"]]


def test_split_sizes_and_all_families_balanced(suite):
    sizes = {"train": 330, "valid": 33, "test": 44, "shift_wording": 44, "shift_long": 44}
    assert {s: len(exs) for s, exs in suite.items()} == sizes
    assert len(FAMILIES) >= 8
    for split, exs in suite.items():
        counts = {f.name: 0 for f in FAMILIES}
        for e in exs:
            counts[e.record.task] += 1
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)


def test_every_example_has_2_to_3_distinct_paraphrases(suite):
    for exs in suite.values():
        for e in exs:
            outs = e.record.outputs
            assert 2 <= len(outs) <= 3 and len(set(outs)) == len(outs), outs


def test_training_targets_mix_paraphrases_within_each_family(suite):
    # the teacher must see several answer styles for the same kind of prompt (multi-modal targets)
    for fam in FAMILIES:
        recs = [e.record for e in suite["train"] if e.record.task == fam.name]
        chosen = [r.target_index(0) for r in recs]
        shares = [chosen.count(k) / len(chosen) for k in range(3)]
        assert min(shares) > 0.1, (fam.name, shares)


def test_splits_are_disjoint_by_problem_and_by_prompt(suite):
    keys = {s: {e.key for e in exs} for s, exs in suite.items()}
    prompts = {s: {(e.record.instruction, e.record.input) for e in exs} for s, exs in suite.items()}
    for s, exs in suite.items():
        assert len(keys[s]) == len(exs), f"duplicate problem inside {s}"
    names = list(suite)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
            assert not prompts[a] & prompts[b], (a, b)


def test_shift_wording_uses_only_held_out_phrasings(suite):
    fams = {f.name: f for f in FAMILIES}
    for f in FAMILIES:
        assert not set(f.train_phrasings) & set(f.shift_phrasings), f.name
    for split in ("train", "valid", "test", "shift_long"):
        for e in suite[split]:
            f = fams[e.record.task]
            assert _matches_any(e.record.instruction, f.train_phrasings), e.record.instruction
    for e in suite["shift_wording"]:
        f = fams[e.record.task]
        assert _matches_any(e.record.instruction, f.shift_phrasings), e.record.instruction
        assert not _matches_any(e.record.instruction, f.train_phrasings), e.record.instruction


def test_shift_long_has_longer_inputs_or_bigger_numbers(suite):
    def of(split, fam):
        return [e for e in suite[split] if e.record.task == fam]

    numbers = {"add": slice(1, 3), "subtract": slice(1, 3), "convert_units": slice(3, 4)}  # operands in the key
    for f in FAMILIES:
        if f.name in numbers:
            train_max = max(max(e.key[numbers[f.name]]) for e in of("train", f.name))
            long_min = min(min(e.key[numbers[f.name]]) for e in of("shift_long", f.name))
            assert long_min > train_max, f.name
        elif f.name == "format_date":  # same length: the years lie outside the training range
            years = [e.key[1] for e in of("train", f.name)]
            assert all(e.key[1] < min(years) or e.key[1] > max(years) for e in of("shift_long", f.name))
        else:
            def mean_len(split):
                return statistics.mean(len(e.record.instruction + e.record.input) for e in of(split, f.name))

            assert mean_len("shift_long") > mean_len("test") + 3, f.name


def test_answers_are_correct_for_checkable_families(suite):
    for e in suite["train"] + suite["shift_long"]:
        r, k = e.record, e.key
        if r.task == "add":
            assert r.outputs[1] == str(k[1] + k[2])
        elif r.task == "subtract":
            assert r.outputs[1] == str(k[1] - k[2]) and k[1] >= k[2]
        elif r.task == "reverse_words":
            assert r.outputs[0].split() == r.input.split()[::-1]
        elif r.task == "sort_words":
            assert r.outputs[0].split() == sorted(r.input.split())
        elif r.task == "count_words":
            assert r.outputs[1] == str(len(r.input.split()))
        elif r.task == "max_number":
            assert r.outputs[1] == str(max(int(x) for x in r.input.split(", ")))
        elif r.task == "count_letter":
            assert r.outputs[1] == str(k[2].count(k[1]))
        elif r.task == "context_qa":
            assert r.outputs[-1].rstrip(".").split()[-1] in r.input  # the answer value is in the passage


def test_bad_generator_params_are_rejected():
    with pytest.raises(ValueError, match="unknown data.generator key 'n_tran'"):
        tasks.generator_params({"n_tran": 5})
    with pytest.raises(ValueError, match="n_train must be a positive int"):
        tasks.generator_params({"n_train": 0})


# ----------------------------------------------------------------------------------------------
# tokenizer


ROUND_TRIP = [
    "160",
    "The answer is 160.",
    "3000 meters\n\n### Response:\n",
    "  two  spaces, a\ttab and trailing space ",
    'quotes "x" and \'y\'; colons: dashes - and (parens)!?',
    "Ünïcödé and emoji 😀 survive too",
    "2024-02-29 -> February 29, 2024",
]


@pytest.fixture(scope="module")
def tokenizer(default_suite_dir):
    return AutoTokenizer.from_pretrained(str(default_suite_dir[0] / "tokenizer"))


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_splits_digits_and_never_spaces_them_out(tokenizer):
    ids = tokenizer.encode("12345", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == list("12345")
    assert tokenizer.decode(tokenizer.encode("x 160 y", add_special_tokens=False)) == "x 160 y"


def test_tokenizer_has_distinct_eos_and_pad_and_configured_size(tokenizer, default_suite_dir):
    _, cfg = default_suite_dir
    assert tokenizer.eos_token == tasks.EOS_TOKEN and tokenizer.pad_token == tasks.PAD_TOKEN
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert len(tokenizer) == cfg.tokenizer_vocab_size
    assert tokenizer.encode("hi", add_special_tokens=False) == tokenizer.encode("hi")  # no BOS/EOS added
    assert tokenizer.chat_template  # template="chat" works with the embedded tokenizer


def test_tokenizer_vocab_floor_is_enforced():
    with pytest.raises(ValueError, match="tokenizer_vocab_size must be >= 260"):
        tasks.train_tokenizer(["abc"], 100)


# ----------------------------------------------------------------------------------------------
# prepare_embedded


def test_default_config_suite_fits_its_length_limits_and_answers_are_short(default_suite_dir, tokenizer):
    suite_dir, cfg = default_suite_dir
    for split in tasks.SPLITS:
        worst = 0
        for r in read_records(suite_dir / f"{split}.jsonl"):
            p = len(tokenizer.encode(render_prompt(r, cfg.template), add_special_tokens=False))
            a = max(len(tokenizer.encode(o, add_special_tokens=False)) for o in r.outputs)
            assert p <= cfg.max_prompt_length, (split, r)
            assert a <= (40 if split == "shift_long" else 30), (split, r)
            worst = max(worst, p + a + 1)
        assert worst <= cfg.max_length, split  # nothing is truncated at these limits


def test_suite_dir_layout_schema_and_meta(tmp_path):
    d = tasks.prepare_embedded(small_cfg(), tmp_path)
    assert d.parent == tmp_path and d.name.startswith("embedded-") and tasks.is_complete(d)
    row = json.loads((d / "train.jsonl").read_text().splitlines()[0])
    assert set(row) == {"instruction", "input", "output", "task"} and isinstance(row["output"], list)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["generator"] == SMALL and meta["tokenizer_vocab_size"] == 320
    assert {s: v["n"] for s, v in meta["splits"].items()} == {
        "train": 330, "valid": 33, "test": 44, "shift_wording": 44, "shift_long": 44}
    assert not list(tmp_path.glob("*.tmp-*"))  # no temp dir left behind


def test_prepare_embedded_reuses_the_cache(tmp_path, monkeypatch):
    d = tasks.prepare_embedded(small_cfg(), tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise AssertionError("rebuilt a complete suite")

    monkeypatch.setattr(tasks, "_build", boom)
    assert tasks.prepare_embedded(small_cfg(), tmp_path) == d
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()} == mtimes


def test_prepare_embedded_rebuilds_an_incomplete_dir(tmp_path):
    d = tasks.prepare_embedded(small_cfg(), tmp_path)
    before = (d / "test.jsonl").read_bytes()
    (d / "meta.json").unlink()
    (d / "test.jsonl").write_text("garbage\n")
    assert tasks.prepare_embedded(small_cfg(), tmp_path) == d
    assert tasks.is_complete(d) and (d / "test.jsonl").read_bytes() == before


def test_regeneration_is_byte_identical_and_params_change_the_dir(tmp_path):
    a = tasks.prepare_embedded(small_cfg(), tmp_path / "a")
    b = tasks.prepare_embedded(small_cfg(), tmp_path / "b")
    assert a.name == b.name
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = tasks.prepare_embedded(small_cfg(seed=8), tmp_path / "a")
    v = tasks.prepare_embedded({**small_cfg(), "tokenizer_vocab_size": 300}, tmp_path / "a")
    assert len({a.name, c.name, v.name}) == 3


def _prepare_in_subprocess(root: str) -> str:
    return str(tasks.prepare_embedded(small_cfg(), Path(root)))


def test_concurrent_prepare_builds_once_and_agrees(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        dirs = list(pool.map(_prepare_in_subprocess, [str(tmp_path)] * 2))
    assert dirs[0] == dirs[1] and tasks.is_complete(Path(dirs[0]))
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(dirs[0]).name]
