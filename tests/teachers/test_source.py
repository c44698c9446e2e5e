"""Where the teacher comes from (distill/teachers/source.py): an SFT cell (kd_ratio=0) builds no teacher at all."""

from distill import models
from distill.train.run import run_cell


def test_sft_mode_loads_no_teacher(smoke_cfg, monkeypatch):
    roles = []
    real_build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda cfg, role, *a, **k: roles.append(role) or real_build(cfg, role, *a, **k))
    m = run_cell(smoke_cfg("loss.kd_ratio=0", "eval.max_examples=2"))
    assert roles == ["student"]
    assert m["name"].startswith("sft-") and m["cell"]["divergence"] == "sft" and m["cell"]["teacher"] is None
    assert "fkl" not in m["valid"] and m["valid"]["ce"] > 0
