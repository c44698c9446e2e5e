"""`distill-analyze` (distill/evaluation/analyze_cli.py) end to end on a tiny trained pair: files, W&B, errors."""
from __future__ import annotations

import pytest
import torch

from distill.evaluation import analyze_cli

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The embedded suite (built in a tmp data root) + tiny random GPT-2 teacher/student saved on its tokenizer."""
    from transformers import AutoModelForCausalLM

    from distill import models
    from distill.data.embedded import prepare_embedded

    root = tmp_path_factory.mktemp("analyze")
    suite = prepare_embedded(analyze_cli._data_defaults("embedded"), root / "data")
    tok = models.load_tokenizer(suite / "tokenizer")
    dirs = {}
    for role, (layers, dim, seed) in {"teacher": (2, 64, 0), "student": (1, 32, 1)}.items():
        torch.manual_seed(seed)
        cfg = models.toy_config("gpt2", {"n_layer": layers, "n_embd": dim, "n_head": 2}, tok, max_length=128)
        dirs[role] = root / role
        AutoModelForCausalLM.from_config(cfg).save_pretrained(dirs[role])
    return root, suite, dirs


def read_csv(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_end_to_end_on_the_embedded_suite(tiny_pair, tmp_path, capsys):
    root, _, dirs = tiny_pair
    out = tmp_path / "out"
    rc = analyze_cli.main(["--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]),
                       "--data-root", str(root / "data"), "--objectives", "fkl,rkl,jsd", "--taus", "0.5,1,4",
                       "--num-examples", "6", "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    rows = read_csv(out / "grad_analysis.csv")
    assert [(r["objective"], float(r["tau"])) for r in rows] == [
        (o, t) for o in ("fkl", "rkl", "jsd") for t in (0.5, 1.0, 4.0)]
    n = int(rows[0]["n_positions"])
    assert n > 6 and all(int(r["n_positions"]) == n for r in rows)  # several response tokens per example
    for r in rows:
        assert 0 <= float(r["share"]) <= 1 and float(r["grad_norm"]) > 0
    md = (out / "grad_analysis.md").read_text()
    assert md.count("| fkl |") == 3 and "share_sq" in md and "cos_tau1" in md and "norm_ratio" in md
    at1 = [r for r in rows if float(r["tau"]) == 1.0]
    assert all(float(r["cos_tau1"]) == pytest.approx(1.0, abs=1e-5) and float(r["norm_ratio"]) == pytest.approx(1.0)
               for r in at1)
    assert (out / "grad_analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    assert "grad_analysis.csv" in capsys.readouterr().out


def test_cli_on_a_jsonl_file_with_wandb_offline(tiny_pair, tmp_path, monkeypatch):
    import json

    root, suite, dirs = tiny_pair
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Reverse the words.", "input": "red blue green", "output": ["green blue red"]},
    ]))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    rc = analyze_cli.main(["--teacher", str(dirs["teacher"]), "--student", str(dirs["student"]), "--data", str(data),
                       "--tokenizer", str(suite / "tokenizer"), "--objectives", "tvd", "--taus", "1,2", "--topk", "2",
                       "--out", str(out), "--wandb"])
    assert rc == 0
    rows = read_csv(out / "grad_analysis.csv")
    assert [(r["objective"], r["topk"]) for r in rows] == [("tvd", "2"), ("tvd", "2")]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.parametrize("change, message", [
    ({"--teacher": "/nonexistent/teacher"}, "--teacher '/nonexistent/teacher': no such directory"),
    ({"--taus": "1,-2"}, "bad tau '-2'"),
    ({"--objectives": "fkl,kl"}, "unknown objective"),
    ({"--data": "/nonexistent.jsonl"}, "no such file"),
    ({"--student": "EMPTY"}, "--student '{EMPTY}': cannot load a model"),
    ({"--topk": "512"}, "topk must be an integer in [1, 511]"),
])
def test_cli_bad_input_is_one_clear_line(tiny_pair, tmp_path, capsys, change, message):
    root, _, dirs = tiny_pair
    empty = tmp_path / "empty"
    empty.mkdir()
    change = {k: str(empty) if v == "EMPTY" else v for k, v in change.items()}
    message = message.replace("{EMPTY}", str(empty))
    args = {"--teacher": str(dirs["teacher"]), "--student": str(dirs["student"]), "--out": str(tmp_path / "out"),
            "--data-root": str(root / "data"), "--num-examples": "2", **change}
    rc = analyze_cli.main([x for kv in args.items() for x in kv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_demo_mode_finds_the_demos_pair_data_and_template(tiny_pair, tmp_path, monkeypatch):
    """`distill-analyze --demo ROOT` reads the prep stages' exported models by their run signatures."""
    import shutil

    from distill.sweep.demo import prep_model_dirs

    root, _, dirs = tiny_pair
    demo_root = tmp_path / "demo_root"
    shutil.copytree(root / "data", demo_root / "data")  # the suite the demo would have built
    for role, target in prep_model_dirs(demo_root).items():
        shutil.copytree(dirs[role], target)
    seen = {}
    from distill.data import encoding

    original = encoding.encode_example
    monkeypatch.setattr(encoding, "encode_example", lambda *a, **k: seen.setdefault("template", k["template"]) and original(*a, **k))
    rc = analyze_cli.main(["--demo", str(demo_root), "--objectives", "fkl,rkl", "--taus", "1,2", "--num-examples", "4"])
    assert rc == 0
    assert seen["template"] == "alpaca_compact"
    assert len(read_csv(demo_root / "demo" / "analysis" / "grad_analysis.csv")) == 4


def test_cli_demo_cell_analyses_a_distilled_student(tiny_pair, tmp_path, capsys):
    """`--demo ROOT --demo-cell rkl-tau1-s0`: the teacher stays the demo's, the student is that cell's export."""
    import shutil

    from distill.sweep.demo import prep_model_dirs

    root, _, dirs = tiny_pair
    demo_root = tmp_path / "demo_root"
    shutil.copytree(root / "data", demo_root / "data")
    for role, target in prep_model_dirs(demo_root).items():
        shutil.copytree(dirs[role], target)
    cell = demo_root / "demo" / "rkl-tau1-s0-0123abcd"
    shutil.copytree(dirs["student"], cell / "student")
    (demo_root / "demo" / "rkl-tau1-s10-89abcdef" / "student").mkdir(parents=True)   # a prefix, not the cell
    args = ["--demo", str(demo_root), "--objectives", "fkl", "--taus", "1,2", "--num-examples", "2"]
    assert analyze_cli.main(args + ["--demo-cell", "rkl-tau1-s0"]) == 0
    assert f"student {cell / 'student'}" in capsys.readouterr().out
    assert len(read_csv(demo_root / "demo" / "analysis-rkl-tau1-s0" / "grad_analysis.csv")) == 2
    assert analyze_cli.main(args + ["--demo-cell", "fkl-tau9-s0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'fkl-tau9-s0': no finished cell" in err and "rkl-tau1-s0" in err
    assert analyze_cli.main(["--demo-cell", "rkl-tau1-s0"]) == 2
    assert "--demo-cell needs --demo" in capsys.readouterr().err


def test_cli_without_a_pair_says_what_to_give(capsys):
    assert analyze_cli.main(["--objectives", "fkl"]) == 2
    assert "give --teacher and --student model dirs, or --demo" in capsys.readouterr().err
