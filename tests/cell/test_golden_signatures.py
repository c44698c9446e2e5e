"""A cell's signature is its identity: a finished sweep is found finished only if every signature stays put.

tests/fixtures/golden_signatures.json was computed once from the code before the package became subpackages
(the demo's every cell, a few cells of every recipe stage and sweep file, and single cells with rollouts,
methods and SFT), for the config alone and with fixed input digests. A change that moves any of them would
rerun every user's finished sweep.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.cell.fingerprints import locate
from distill.cell.identity import cell_name, signature
from distill.config import compose

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "golden_signatures.json").read_text())


def test_every_golden_cell_keeps_its_name_and_signature():
    moved = []
    for cell in GOLDEN["cells"]:
        cfg = compose(cell["overrides"])
        got = (cell_name(cfg), signature(cfg), signature(cfg, inputs=GOLDEN["inputs"]))
        if got != (cell["name"], cell["signature"], cell["signature_inputs"]):
            moved.append((cell["overrides"], got))
    assert not moved, f"{len(moved)} of {len(GOLDEN['cells'])} cells moved, e.g. {moved[:3]}"
    assert len(GOLDEN["cells"]) > 100


@pytest.mark.parametrize("cell", GOLDEN["demo_prep_dirs"], ids=lambda c: c["overrides"][0])
def test_the_demos_prep_cells_keep_their_dirs_with_their_real_inputs(cell, tmp_path):
    """The teacher's and the warm start's full dir names: the embedded suite's content digest included."""
    run_dir, _ = locate(compose([*cell["overrides"], f"paths.root={tmp_path}"]))
    assert run_dir.name == cell["dir"]
