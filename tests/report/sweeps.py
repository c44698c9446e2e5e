"""The report tests' sweeps: the fixture sweep (tests/fixtures/report/sweep) and what its files hold, the same
sweep with reference models (`fixture_sweep`), a constructed sweep whose verdicts are known, and readers of
report.csv / report.md.

`fixture_sweep` gives the fixture sweep two small extras: train_log.jsonl and generations for fkl-tau1-s0 and
rkl-tau1-s0, and a teacher and an SFT warm start in tests/fixtures/report/prep whose exported `student/` dirs
the cells point at."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).parents[1] / "fixtures" / "report" / "sweep"


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


FIXTURES = Path(__file__).parents[1] / "fixtures" / "report"
TEACHER, WARM_START = "sft-s0-1111aaaa", "sft-s0-2222bbbb"


def fixture_sweep(tmp_path: Path) -> Path:
    """A copy of the fixture sweep whose cells name the prep teacher and warm start as their models."""
    shutil.copytree(FIXTURES / "prep", tmp_path / "prep")
    sweep = tmp_path / "fixture-sweep"
    shutil.copytree(FIXTURES / "sweep", sweep)
    for path in sweep.glob("*/metrics.json"):
        m = json.loads(path.read_text())
        m["cell"]["teacher"] = str(tmp_path / "prep" / TEACHER / "student")
        m["cell"]["student"] = f"prep/{WARM_START}/student"   # relative to the output root
        path.write_text(json.dumps(m))
    return sweep
