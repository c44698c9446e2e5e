"""The peer benchmarks run end to end in their --quick mode and compute the same thing as the peers.

These check that the scripts work (every variant ran, ours and the peers agree), never how fast anything is: the
numbers are for a person to read (benchmarks/README.md). The peers are the `peers` extras that `make install`
installs; without them these tests fail and say what to install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("trl", "liger-kernel", "torchtune")

pytestmark = pytest.mark.slow


def _require_peers() -> None:
    missing = []
    for dist in PEERS:
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        pytest.fail(f"peer packages missing: {', '.join(missing)}; `make install` installs them (pyproject.toml "
                    "extras peers and peers-nodeps)")


def _run(script: str, args: list[str], tmp_path: Path) -> dict:
    """`python -m benchmarks.<script> ARGS --json FILE` from the repository root, as a person runs it; its JSON."""
    out_json = tmp_path / f"{script}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args, "--json", str(out_json)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "versions: torch" in proc.stdout  # the script says what it measured
    return json.loads(out_json.read_text())


def test_bench_losses_quick_runs_ours_and_the_peers_and_they_agree(tmp_path):
    _require_peers()
    out = _run("bench_losses", ["--quick", "--objectives", "fkl,jsd"], tmp_path)
    ran = {(r["section"], r["objective"], r["variant"]) for r in out["results"]}
    expected = {("logits", o, v) for o in ("fkl", "jsd") for v in ("naive", "plain", "chunked")}
    expected |= {("hidden", o, v) for o in ("fkl", "jsd") for v in ("naive", "plain", "chunked", "fused", "liger",
                                                                   "liger-compiled")}
    expected |= {("logits", "fkl", "torchtune"), ("hidden", "fkl", "torchtune")}
    assert ran == expected  # torchtune computes fkl only, Liger works from hidden states
    for r in out["results"]:
        if r["variant"] != "naive":
            # the peers' values converted to our convention (true KL, x tau^2) equal ours, gradients too
            assert r["d_loss"] < 1e-5 and r["d_grad"] < 1e-4, r
        assert r["extra_mib"] > 0 and r["time_s"] > 0


def test_bench_peers_quick_trains_both_sides_on_the_same_batches(tmp_path):
    _require_peers()
    out = _run("bench_peers", ["--quick", "--root", str(tmp_path)], tmp_path)
    by_config = {(r["objective"], r["tau"]): r for r in out["results"]}
    assert set(by_config) == {("fkl", 1.0), ("fkl", 2.0), ("jsd", 1.0), ("jsd", 2.0)}
    for r in out["results"]:
        assert r["same_init"]
        steps = r["steps"]
        assert len(steps) == 6 and all({"ours_loss", "trl_loss", "ours_cpu", "trl_cpu"} <= set(s) for s in steps)
        assert r["summary"]["max_rel"] < 1e-4  # step by step, the same losses
        assert steps[-1]["ours_loss"] < steps[0]["ours_loss"]  # and they train
        assert set(r["rougeL"]) == {"test", "shift_wording", "shift_long"}
    # GKDTrainer ignores its temperature in the loss: unmodified, at tau=2 it gives the tau=1 loss
    for objective in ("fkl", "jsd"):
        at_1, at_2 = by_config[(objective, 1.0)], by_config[(objective, 2.0)]
        assert at_2["upstream_first_loss"] == pytest.approx(at_1["steps"][0]["ours_loss"], rel=1e-5)
        assert at_2["steps"][0]["ours_loss"] != pytest.approx(at_1["steps"][0]["ours_loss"], rel=1e-2)
