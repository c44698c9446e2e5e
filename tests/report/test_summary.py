"""distill.report: tables, best marks, FKL-RKL, unfinished cells, PNG and CLI errors.

The fixture sweep (tests/fixtures/report/sweep) holds hand-made metrics files: fkl, rkl, jsd x
tau 1, 2, 4 x seeds 0, 1 completed on two benchmarks, plus one running, one failed and one
missing cell. Expected numbers are recomputed here from the JSON files with numpy.
"""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from distill.report import cli as report_cli
from distill.report import summary as report

FIXTURE = Path(__file__).parents[1] / "fixtures" / "report" / "sweep"


@pytest.fixture
def sweep(tmp_path):
    dst = tmp_path / "fixture-sweep"
    shutil.copytree(FIXTURE, dst)
    return dst


def expected_scores():
    """(bench, div, tau) -> {seed: rougeL_mean} straight from the fixture files."""
    out = {}
    for path in FIXTURE.glob("*/metrics.json"):
        m = json.loads(path.read_text())
        if m["status"] != "completed":
            continue
        c = m["cell"]
        for bench, ev in m["eval"].items():
            out.setdefault((bench, c["divergence"], float(c["tau"])), {})[c["seed"]] = ev["rougeL_mean"]
    return out


def read_csv(path):
    with open(path) as f:
        return {(r["benchmark"], r["row"], float(r["tau"])): r for r in csv.DictReader(f)}


def md_section(md, bench):
    """The markdown between '## bench' and the next '## '."""
    part = md.split(f"## {bench}\n", 1)[1]
    return part.split("\n## ", 1)[0]


def md_row(section, label):
    line = next(l for l in section.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_table_numbers_best_and_difference(sweep):
    paths = report.build_report(sweep)
    assert set(paths) == {"report.md", "report.csv", "report.png", "report.html"}
    exp = expected_scores()
    rows = read_csv(sweep / "report.csv")
    md = (sweep / "report.md").read_text()
    benches = sorted({k[0] for k in exp})
    taus = [1.0, 2.0, 4.0]
    assert len(benches) == 2
    for bench in benches:
        section = md_section(md, bench)
        for i, tau in enumerate(taus):
            means = {}
            for div in ("fkl", "rkl", "jsd"):
                vals = np.array(list(exp[(bench, div, tau)].values()))
                mean, std = vals.mean(), vals.std(ddof=1)
                means[div] = mean
                r = rows[(bench, div, tau)]
                assert float(r["rougeL_mean"]) == pytest.approx(mean, abs=1e-4)
                assert float(r["rougeL_std"]) == pytest.approx(std, abs=1e-4)
                assert int(r["n"]) == 2
                assert md_row(section, div)[i].strip("*") == f"{mean:.1f} ± {std:.1f} (n=2)"
            top = max(means.values())
            for div, mean in means.items():
                is_best = mean == top
                assert rows[(bench, div, tau)]["best"] == str(int(is_best)), (bench, div, tau)
                assert md_row(section, div)[i].startswith("**") == is_best, (bench, div, tau)
            f, r = exp[(bench, "fkl", tau)], exp[(bench, "rkl", tau)]
            diffs = np.array([f[s] - r[s] for s in sorted(f.keys() & r.keys())])
            d = rows[(bench, "fkl-rkl", tau)]
            assert float(d["rougeL_mean"]) == pytest.approx(diffs.mean(), abs=1e-4)
            assert float(d["rougeL_std"]) == pytest.approx(diffs.std(ddof=1), abs=1e-4)
            assert int(d["n"]) == len(diffs) == 2
            cell = md_row(section, "FKL − RKL [95% CI]")[i]
            assert cell.startswith(f"{diffs.mean():+.1f}") and cell.endswith("(n=2)")
            if diffs.std(ddof=1) > 0:   # the fixture has one zero-spread pair: no interval there
                lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
                assert float(d["ci_low"]) == pytest.approx(lo, abs=1e-4)
                assert float(d["ci_high"]) == pytest.approx(hi, abs=1e-4)
                assert f"[{lo:+.1f}, {hi:+.1f}]" in cell
                assert d["test"] == "paired t (df=1)" and d["comparison"] == "fkl-rkl"
            else:
                assert d["ci_low"] == "" and "zero spread" in d["verdict"]


def test_sentence_follows_the_data(sweep):
    report.build_report(sweep)
    md = (sweep / "report.md").read_text()
    exp = expected_scores()
    for bench in ("test", "shift_long"):
        d = {t: np.mean([exp[(bench, "fkl", t)][s] - exp[(bench, "rkl", t)][s] for s in (0, 1)]) for t in (1.0, 2.0, 4.0)}
        section = md_section(md, bench)
        if round(d[1.0], 1) < 0:
            assert f"At τ=1 RKL leads FKL by {-d[1.0]:.1f} ROUGE-L on the mean" in section
        elif round(d[1.0], 1) == 0:
            assert "At τ=1 FKL and RKL tie" in section
        else:
            assert "At τ=1 RKL does not lead" in section
        overtakes = [t for t in (2.0, 4.0) if round(d[t], 1) > 0]
        if round(d[1.0], 1) <= 0:
            if overtakes:
                assert f"FKL's mean overtakes RKL's at τ={overtakes[0]:g}" in section
            else:
                assert "FKL's mean does not overtake RKL's at any higher τ" in section
        # the sentence carries each difference's interval and verdict, never 'beyond the spread'
        assert "not resolved with 2 seeds (paired t)" in section and "the spread" not in section
    # the fixture was built to show both outcomes; make sure it still does
    assert "RKL leads FKL" in md and "FKL's mean overtakes RKL's" in md and "does not overtake" in md


def test_unfinished_cells_are_listed_not_dropped(sweep):
    from distill.cell.lock import CellLock

    running = next(d for d in sweep.iterdir() if (d / "metrics.json").exists()
                   and json.loads((d / "metrics.json").read_text())["status"] == "running")
    lock = CellLock(running)  # a live holder: the cell really is running
    lock.acquire(wait_s=0)
    try:
        report.build_report(sweep)
    finally:
        lock.release()
    md = (sweep / "report.md").read_text()
    problems = md.split("## Unfinished cells", 1)[1]
    statuses = {}
    for d in FIXTURE.iterdir():
        if d.name.startswith("."):
            continue
        m = d / "metrics.json"
        statuses[d.name] = json.loads(m.read_text())["status"] if m.exists() else "missing"
    unfinished = {k: v for k, v in statuses.items() if v != "completed"}
    assert sorted(unfinished.values()) == ["failed", "missing", "running"]
    for name, status in unfinished.items():
        line = next(l for l in problems.splitlines() if l.startswith(f"| {name} |"))
        assert f"| {status} |" in line
    failed = next(k for k, v in unfinished.items() if v == "failed")
    err = json.loads((FIXTURE / failed / "metrics.json").read_text())["error"]
    assert err.splitlines()[-1] in problems
    assert "1 running, 1 failed, 1 missing" in md
    # the unfinished cells are seed 2, which must not appear as a seed in any entry
    assert all(r["n"] == "2" and "2" not in r["seeds"].split() for r in read_csv(sweep / "report.csv").values())


def test_png_is_a_real_plot(sweep):
    from PIL import Image

    report.build_report(sweep)
    png = sweep / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.load()
        w, h = im.size
        assert w > 800 and h > 400
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # lines, text and anti-aliasing, not a blank canvas
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing behind


def test_unreadable_and_duplicate_cells(sweep):
    (sweep / "bad-cell-0123abcd").mkdir()
    (sweep / "bad-cell-0123abcd" / "metrics.json").write_text("{not json")
    (sweep / "old-cell-89abcdef").mkdir()
    (sweep / "old-cell-89abcdef" / "metrics.json").write_text(json.dumps({"schema_version": 0, "status": "completed"}))
    # a second completed dir for an existing cell: newer one wins, the older is listed as superseded
    src = next(FIXTURE.glob("fkl-tau1-s0-*/metrics.json"))
    m = json.loads(src.read_text())
    m["updated_at"] = "2026-11-29T00:00:00+00:00"
    for ev in m["eval"].values():
        ev["rougeL_mean"] += 10.0
    (sweep / "fkl-tau1-s0-ffffffff").mkdir()
    (sweep / "fkl-tau1-s0-ffffffff" / "metrics.json").write_text(json.dumps(m))
    report.build_report(sweep)
    md = (sweep / "report.md").read_text()
    assert "| bad-cell-0123abcd | unreadable |" in md and "not valid JSON" in md
    assert "| old-cell-89abcdef | unreadable |" in md and "schema_version 0" in md
    assert f"| {src.parent.name} | superseded |" in md
    r = read_csv(sweep / "report.csv")[("test", "fkl", 1.0)]
    exp = expected_scores()[("test", "fkl", 1.0)]
    assert int(r["n"]) == 2
    assert float(r["rougeL_mean"]) == pytest.approx((exp[0] + 10.0 + exp[1]) / 2)


def test_varying_divergence_param_gets_its_own_row(tmp_path):
    def write(name, beta, score):
        d = tmp_path / name
        d.mkdir()
        m = {"schema_version": 1, "status": "completed", "sweep": "s",
             "cell": {"divergence": "jsd", "divergence_params": {"beta": beta}, "tau": 1.0, "seed": 0},
             "eval": {"b": {"rougeL_mean": score}}}
        (d / "metrics.json").write_text(json.dumps(m))

    write("jsd-a-00000001", 0.1, 30.0)
    write("jsd-b-00000002", 0.9, 40.0)
    report.build_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert float(rows[("b", "jsd (beta=0.1)", 1.0)]["rougeL_mean"]) == 30.0
    assert rows[("b", "jsd (beta=0.9)", 1.0)]["best"] == "1"
    md = (tmp_path / "report.md").read_text()
    assert "FKL and RKL were not both run" in md
    assert "| jsd (beta=0.1) | 30.0 (n=1) |" in md  # one seed: no spread to show


def test_cli_writes_report(sweep, capsys):
    assert report_cli.main([str(sweep)]) == 0
    assert "report.md" in capsys.readouterr().out
    assert (sweep / "report.md").exists()


@pytest.mark.parametrize("make", ["missing", "empty", "hidden-only"])
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, make):
    target = tmp_path / "sweep"
    if make != "missing":
        target.mkdir()
    if make == "hidden-only":
        (target / ".hydra-jobs" / "0").mkdir(parents=True)
        (target / "data").mkdir()  # not named like a cell, no metrics.json
    assert report_cli.main([str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distill-report: error:") and str(target) in err


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "distill-report"
    proc = subprocess.run([str(exe), str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("distill-report: error:") and len(proc.stderr.strip().splitlines()) == 1


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        report_cli.main(["somewhere", "--group", "g"])
    assert e.value.code == 2
    assert report_cli.main(["somewhere", "--wandb", "no-slash"]) == 1
    assert "ENTITY/PROJECT" in capsys.readouterr().err


def fake_run(name, state, div, tau, seed, score):
    """A W&B run as distill.tracking logs it: nested resolved config, slash-named final summary."""
    config = {"tau": tau, "seed": seed, "divergence": {"name": div}, "loss": {"kd_ratio": 1.0},
              "model": {"name": "toy"}, "data": {"name": "embedded"}}
    summary = {} if score is None else {"eval/test/rougeL": score, "eval/test/rougeL_std": 1.0, "valid/ce": 2.0,
                                        "eval/test/generations": {"_type": "table-file"}}
    return SimpleNamespace(id=f"{name}-0000abcd", name=name, state=state, job_type="distill", config=config,
                           summary=summary)


def test_wandb_source_with_mocked_api(tmp_path, monkeypatch):
    import wandb

    runs = [fake_run("fkl-tau1-s0", "finished", "fkl", 1.0, 0, 40.0),
            fake_run("fkl-tau1-s1", "finished", "fkl", 1.0, 1, 42.0),
            fake_run("rkl-tau1-s0", "finished", "rkl", 1.0, 0, 45.0),
            fake_run("rkl-tau1-s1", "crashed", "rkl", 1.0, 1, None)]
    calls = []

    class FakeApi:
        def __init__(self, **kw):
            pass

        def runs(self, path, filters):
            calls.append((path, filters))
            return runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    out = tmp_path / "out"
    assert report_cli.main([str(out), "--wandb", "ent/proj", "--group", "demo"]) == 0
    assert calls == [("ent/proj", {"group": "demo"})]
    rows = read_csv(out / "report.csv")
    assert float(rows[("test", "fkl", 1.0)]["rougeL_mean"]) == pytest.approx(41.0)
    assert rows[("test", "rkl", 1.0)]["n"] == "1"
    assert float(rows[("test", "fkl-rkl", 1.0)]["rougeL_mean"]) == pytest.approx(-5.0)
    md = (out / "report.md").read_text()
    assert "# Sweep report: demo" in md and "| rkl-tau1-s1-0000abcd | failed |" in md


def test_rollouts_get_their_own_rows_and_old_cells_count_as_offline(tmp_path):
    def write(name, div, rollout, seed, score):
        d = tmp_path / name
        d.mkdir()
        cell = {"divergence": div, "divergence_params": {}, "tau": 1.0, "seed": seed}
        if rollout is not None:
            cell["rollout"] = rollout
        (d / "metrics.json").write_text(json.dumps({"schema_version": 1, "status": "completed", "sweep": "s",
                                                    "cell": cell, "eval": {"b": {"rougeL_mean": score}}}))

    write("fkl-old-00000001", "fkl", None, 0, 30.0)          # written before rollouts existed
    write("fkl-new-00000002", "fkl", "offline", 1, 32.0)
    write("rkl-new-00000003", "rkl", "offline", 0, 35.0)
    write("jsd-onp-00000004", "jsd", "on_policy λ=0.5", 0, 40.0)
    report.build_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert rows[("b", "fkl (rollout=offline)", 1.0)]["n"] == "2"  # the old cell joined the new one
    assert rows[("b", "jsd (rollout=on_policy λ=0.5)", 1.0)]["best"] == "1"
    assert float(rows[("b", "fkl-rkl (rollout=offline)", 1.0)]["rougeL_mean"]) == pytest.approx(-5.0)
    cell = report.record_from_wandb("r", "finished", {"divergence": {"name": "jsd"}, "tau": 1, "seed": 0,
                                                      "rollout": {"name": "on_policy", "lmbda": 0.5}},
                                    {"eval/b/rougeL": 40.0})   # nested config, slash summary (distill.tracking)
    assert cell.label_source["rollout"] == "on_policy λ=0.5"


# ----------------------------------------------------------------------------- statistics (issue 19)

BASE = np.array([30.0, 31.0, 29.0, 30.5, 29.5])   # per training seed: the SFT baseline's scores


def constructed_sweep(root):
    """sft (tau-free) + fkl/rkl at tau 1, 2 over 5 seeds; per-seed scores chosen so the verdicts are known.

    fkl - sft at tau 1 is 2 + small noise (resolved); rkl beats fkl by ~4 at tau 1 (resolved); at tau 2
    fkl - rkl is ~0.6 with a spread of ~1.3 (not resolved). Each cell's eval seeds sit ± 0.2 around its score.
    """
    scores = {("sft", 1.0): BASE,
              ("fkl", 1.0): BASE + 2 + np.array([0.3, -0.2, 0.1, -0.4, 0.2]),
              ("rkl", 1.0): BASE + 6 + np.array([-0.1, 0.4, 0.0, 0.3, -0.2]),
              ("fkl", 2.0): BASE + 3 + np.array([1.0, -0.4, 0.6, -0.6, 1.4]),
              ("rkl", 2.0): BASE + 3 + np.array([-0.3, 0.5, -0.6, 0.2, -0.8])}
    for (div, tau), vals in scores.items():
        for seed, v in enumerate(vals):
            d = root / f"{div}-tau{tau:g}-s{seed}-{seed:04x}{int(tau):02x}{len(div):02x}"
            d.mkdir(parents=True)
            sft = div == "sft"
            cell = {"divergence": div, "divergence_params": {}, "tau": tau, "tau_target": "both",
                    "tau_squared": True, "kd_ratio": 0.0 if sft else 1.0, "seed": seed, "model": "toy",
                    "teacher": None if sft else "t", "student": "warm", "dataset": "embedded"}
            m = {"schema_version": 1, "status": "completed", "sweep": "stat", "cell": cell,
                 "eval": {"test": {"rougeL_mean": float(v), "rougeL_per_seed": [float(v) - 0.2, float(v) + 0.2]}}}
            (d / "metrics.json").write_text(json.dumps(m))
    return scores


@pytest.fixture
def constructed(tmp_path):
    """The constructed sweep's scores, its report.csv rows and its report.md."""
    scores = constructed_sweep(tmp_path)
    report.build_report(tmp_path)
    return scores, read_csv(tmp_path / "report.csv"), (tmp_path / "report.md").read_text()


def test_sft_baseline_fills_every_tau_and_every_objective_is_compared_with_it(constructed):
    scores, rows, md = constructed
    # kd_ratio/teacher differ only because SFT is SFT: the rows stay 'fkl', 'rkl', 'sft'
    assert {k[1] for k in rows if rows[k]["comparison"] == ""} == {"sft", "fkl", "rkl"}
    for tau in (1.0, 2.0):
        assert float(rows[("test", "sft", tau)]["rougeL_mean"]) == pytest.approx(BASE.mean(), abs=1e-4)
        for div in ("fkl", "rkl"):
            d = scores[(div, tau)] - BASE
            r = rows[("test", f"{div} - sft", tau)]
            lo, hi = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
            assert r["comparison"] == "vs-sft" and int(r["n"]) == 5
            assert (float(r["ci_low"]), float(r["ci_high"])) == (pytest.approx(lo, abs=1e-4), pytest.approx(hi, abs=1e-4))
            assert float(r["p_value"]) == pytest.approx(stats.ttest_rel(scores[(div, tau)], BASE).pvalue, abs=1e-4)
            assert r["verdict"] == f"{div} ahead, 95% CI excludes 0 (paired t, n=5)"
            assert float(r["boot_low"]) < d.mean() < float(r["boot_high"])   # n = 5: bootstrap beside it
    assert "| sft | 30.0 ± 0.8 (n=5) | 30.0 ± 0.8 (n=5) |" in md
    assert "95% CI (bootstrap)" in md and "fkl − sft (objective − SFT)" in md


def test_verdicts_and_seeds_needed_for_constructed_differences(constructed):
    scores, rows, md = constructed
    # tau 1: rkl ahead of fkl by ~4, resolved; it is also the best - second comparison there
    r1 = rows[("test", "fkl-rkl", 1.0)]
    assert r1["verdict"] == "rkl ahead, 95% CI excludes 0 (paired t, n=5)" and r1["seeds_needed"] == ""
    best = rows[("test", "best-second (rkl - fkl)", 1.0)]
    assert best["comparison"] == "best-second" and float(best["rougeL_mean"]) == pytest.approx(-float(r1["rougeL_mean"]))
    # tau 2: ~0.6 at a spread of ~1.3: not resolved; the power calculation says how many seeds would be
    d = scores[("fkl", 2.0)] - scores[("rkl", 2.0)]
    r2 = rows[("test", "fkl-rkl", 2.0)]
    assert stats.ttest_rel(scores[("fkl", 2.0)], scores[("rkl", 2.0)]).pvalue > 0.05
    assert r2["verdict"] == "not resolved with 5 seeds (paired t, 95% CI includes 0)"
    from distill.report.statistics import paired_t_power

    need = int(r2["seeds_needed"])
    effect = abs(d.mean()) / d.std(ddof=1)
    assert need > 5 and paired_t_power(effect, need - 1) < 0.8 <= paired_t_power(effect, need)
    assert f"~{need} training seeds" in md
    assert "At τ=1 RKL leads FKL by" in md and "excludes 0 (paired t, n=5)" in md


def test_eval_and_training_seed_spread_apart(constructed):
    scores, rows, md = constructed
    r = rows[("test", "fkl", 1.0)]
    train_sd = scores[("fkl", 1.0)].std(ddof=1)
    assert float(r["rougeL_std"]) == pytest.approx(train_sd, abs=1e-4)
    assert float(r["eval_seed_std"]) == pytest.approx(np.std([-0.2, 0.2], ddof=1), abs=1e-4)
    assert float(r["n_eval_seeds"]) == 2
    assert float(r["eval_share"]) == pytest.approx((0.08 / 2) / train_sd**2, abs=1e-4)
    assert "**training seeds dominate**" in md


def test_eval_sampling_dominating_is_said(tmp_path):
    # the same score on every training seed, eval seeds 6 points apart: all the spread is eval sampling
    for seed in range(3):
        d = tmp_path / f"fkl-tau1-s{seed}-0000000{seed}"
        d.mkdir()
        m = {"schema_version": 1, "status": "completed", "cell": {"divergence": "fkl", "tau": 1.0, "seed": seed},
             "eval": {"b": {"rougeL_mean": 40.0 + 0.1 * seed, "rougeL_per_seed": [37.0 + 0.1 * seed, 43.0 + 0.1 * seed]}}}
        (d / "metrics.json").write_text(json.dumps(m))
    report.build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "**eval sampling dominates**" in md
    # eval sampling alone predicts more than the seeds' spread: a share of 100 %, said as such, never above
    assert "explains a median 100% of the variance" in md and "as much variation between training seeds as was seen" in md
    assert not re.search(r"\b(10[1-9]|1[1-9]\d|[2-9]\d\d|\d{4,})%", md)


def test_plot_caption_says_what_the_error_bars_are(tmp_path):
    constructed_sweep(tmp_path)
    summary = report.summarize(report.scan_sweep(tmp_path))
    caption = report.plot_caption(summary, "stat")
    assert "± 1 sample std over training seeds (not a CI)" in caption and "n = 5" in caption


def test_dead_running_cells_are_stale_and_attempts_are_counted(sweep):
    from distill.cell.lock import Holder, LOCK_FILE

    cells = {d.name: d for d in sweep.iterdir() if (d / "metrics.json").exists()}
    running = next(d for d in cells.values() if json.loads((d / "metrics.json").read_text())["status"] == "running")
    dead = Holder.me(30, 300)
    dead.host, dead.updated_at = "node9", dead.updated_at - 3600
    (running / LOCK_FILE).write_text(dead.to_json())  # its job was SIGKILLed an hour ago
    failed = next(d for d in cells.values() if json.loads((d / "metrics.json").read_text())["status"] == "failed")
    m = json.loads((failed / "metrics.json").read_text())
    m.update(status="interrupted", error="stopped by SIGTERM at step 40",
             attempts=[{"attempt": 1, "start_step": 0, "end_step": 40, "status": "interrupted"}])
    (failed / "metrics.json").write_text(json.dumps(m))
    done = next(d for d in cells.values() if json.loads((d / "metrics.json").read_text())["status"] == "completed")
    m = json.loads((done / "metrics.json").read_text())
    m["attempts"] = [{"attempt": 1, "status": "interrupted"}, {"attempt": 2, "status": "completed"}]
    (done / "metrics.json").write_text(json.dumps(m))

    report.build_report(sweep)
    md = (sweep / "report.md").read_text()
    problems = md.split("## Unfinished cells", 1)[1]
    stale = next(l for l in problems.splitlines() if l.startswith(f"| {running.name} |"))
    assert "| stale |" in stale and "heartbeat is 3600 s old" in stale
    line = next(l for l in problems.splitlines() if l.startswith(f"| {failed.name} |"))
    assert "| interrupted | 40 | 1 |" in line and "stopped by SIGTERM at step 40" in line
    assert f"more than one: {done.name} (2)." in md
    assert "1 stale, 1 interrupted, 1 missing" in md


def test_budget_splits_rows_and_an_older_cell_without_it_does_not(tmp_path):
    def write(name, div, seed, score, **extra):
        d = tmp_path / name
        d.mkdir()
        cell = {"divergence": div, "tau": 1.0, "seed": seed, "kd_ratio": 0.0 if div == "sft" else 1.0, **extra}
        m = {"schema_version": 1, "status": "completed", "cell": cell, "eval": {"b": {"rougeL_mean": score}}}
        (d / "metrics.json").write_text(json.dumps(m))

    write("fkl-tau1-s0-00000001", "fkl", 0, 30.0)                       # written before max_steps was recorded
    write("fkl-tau1-s1-00000002", "fkl", 1, 32.0, max_steps=150)
    write("sft-s0-00000003", "sft", 0, 20.0, max_steps=150)
    report.build_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert rows[("b", "fkl", 1.0)]["n"] == "2"
    write("fkl-tau1-s0-00000004", "fkl", 0, 40.0, max_steps=450)
    write("sft-s0-00000005", "sft", 0, 25.0, max_steps=450)
    report.build_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert float(rows[("b", "fkl (max_steps=450)", 1.0)]["rougeL_mean"]) == 40.0
    assert rows[("b", "fkl (max_steps=150)", 1.0)]["n"] == "1"
    # each budget is compared with the SFT baseline of the same budget
    assert float(rows[("b", "fkl (max_steps=450) - sft (max_steps=450)", 1.0)]["rougeL_mean"]) == 15.0
