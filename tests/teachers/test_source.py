"""Where the teacher comes from (distill/teachers/source.py): an SFT cell (kd_ratio=0) builds no teacher at all; how
long a cell waits for another cell's teacher-cache build (loss.teacher_cache_wait_s)."""

import pytest

from distill import models
from distill.cell.identity import signature
from distill.options import ConfigError
from distill.teachers.source import cache_wait_s
from distill.train.run import run_cell


def test_sft_mode_loads_no_teacher(smoke_cfg, monkeypatch):
    roles = []
    real_build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda cfg, role, *a, **k: roles.append(role) or real_build(cfg, role, *a, **k))
    m = run_cell(smoke_cfg("loss.kd_ratio=0", "eval.max_examples=2"))
    assert roles == ["student"]
    assert m["name"].startswith("sft-") and m["cell"]["divergence"] == "sft" and m["cell"]["teacher"] is None
    assert "fkl" not in m["valid"] and m["valid"]["ce"] > 0


def test_the_cache_wait_setting_changes_no_signature_and_a_bad_value_is_refused_in_one_line(smoke_cfg):
    """loss.teacher_cache_wait_s says how long to wait for another cell's build, not what a cell computes."""
    base = smoke_cfg()
    assert base.loss.teacher_cache_wait_s == 3600 and cache_wait_s(base) == 3600.0
    assert cache_wait_s(smoke_cfg("loss.teacher_cache_wait_s=null")) is None
    for value in ("5", "null"):
        assert signature(smoke_cfg(f"loss.teacher_cache_wait_s={value}")) == signature(base)
    for value in ("-1", "soon", "true"):
        with pytest.raises(ConfigError) as err:
            cache_wait_s(smoke_cfg(f"loss.teacher_cache_wait_s={value}"))
        assert str(err.value).startswith("loss.teacher_cache_wait_s=") and "\n" not in str(err.value)
        assert "must be a number of seconds >= 0, or null (wait for ever)" in str(err.value)
