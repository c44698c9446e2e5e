"""scripts/ablation_tables.py: docs/results/ablation.md's tables from cells' metrics.json, on a synthetic sweep."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablation_tables.py"
spec = importlib.util.spec_from_file_location("ablation_tables", SCRIPT)
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


def write_cell(root: Path, div: str, tau: float, sq: bool, steps: int, seed: int, score: float, kd: float = 1.0):
    cell = {"divergence": div, "tau": tau, "tau_squared": sq, "kd_ratio": kd, "seed": seed, "max_steps": steps}
    d = root / f"{div}-tau{tau:g}-{'sq' if sq else 'nosq'}-{steps}-s{seed}-0000abcd"
    d.mkdir(parents=True)
    ev = {b: {"rougeL_mean": score + i} for i, b in enumerate(tables.BENCHMARKS)}
    (d / "metrics.json").write_text(json.dumps({"schema_version": 1, "status": "completed", "name": d.name,
                                                "cell": cell, "eval": ev}))


def test_tables_pair_by_seed_and_list_what_beats_rkl_at_tau_1(tmp_path, capsys):
    demo, abl = tmp_path / "demo", tmp_path / "abl"
    for s, noise in enumerate((0.0, 0.3, -0.2)):
        write_cell(demo, "rkl", 1.0, True, 150, s, 30 + noise)
        write_cell(abl, "fkl", 2.0, True, 150, s, 35 + noise + 0.1 * s)    # ahead of RKL τ=1 by ~5 every seed
        write_cell(abl, "fkl", 2.0, False, 150, s, 35 + noise + 0.1 * s)   # τ² changes nothing
        write_cell(abl, "sft", 1.0, True, 150, s, 20 + noise, kd=0.0)
        write_cell(abl, "fkl", 2.0, True, 450, s, 38 + noise)

    assert tables.main([str(demo), str(abl)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("15 completed cells")
    assert "| 150 | fkl | on | – | 35.1 |" in out and "| 150 | sft | – | 20.0 (every τ) |" in out  # means over seeds
    # FKL τ=2 (τ² on and off) at 150 steps beats RKL τ=1 on each benchmark: 6 comparisons, all resolved
    assert "6 comparisons: 6 resolved in X's favour, 0 resolved in RKL τ = 1's favour, 0 not resolved" in out
    assert "| 150 | fkl | 2 | off | test | +5.1 [" in out
    assert "| 150 | fkl | 2 | +0.0 on every seed |" in out  # identical twins: no interval, no claim
    assert "| fkl | on | – | +2.9* | test |" in out                      # 450 − 150, paired, resolved


def test_a_missing_sweep_dir_is_a_one_line_error(tmp_path, capsys):
    assert tables.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"ablation_tables: no such sweep dir: {tmp_path / 'nope'}"
