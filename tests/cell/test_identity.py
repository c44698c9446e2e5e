"""distill/cell/identity.py: a cell's signature, name and run dir, and the labels the report groups on."""

import re

import pytest
from omegaconf import OmegaConf

from distill.cell import identity as runs
from distill.cell.identity import rollout_label
from distill.cell.results import METRICS_FILE, is_completed, read_metrics, write_metrics
from distill.files import atomic_write_json
from tests.conftest import compose

SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": None, "no_repeat_ngram_size": 0}


def test_signature_ignores_logging_paths_and_launcher_but_not_results():
    base = compose(["paths.root=/a"])
    same = compose(["paths.root=/b", "logger=none", "sweep_name=other", "force=true", "trainer.log_every=3"])
    assert runs.signature(base) == runs.signature(same)
    for override in ("tau=2", "seed=1", "divergence=rkl", "divergence=jsd", "loss.kd_ratio=0.5", "trainer.lr=0.1"):
        assert runs.signature(compose([override])) != runs.signature(base), override


def test_int_and_float_spellings_are_the_same_cell():
    assert runs.signature(compose(["tau=1"])) == runs.signature(compose(["tau=1.0"]))
    assert runs.signature(compose(["divergence=ab", "divergence.alpha=1", "divergence.beta=0"])) == runs.signature(
        compose(["divergence=ab", "divergence.alpha=1.0", "divergence.beta=0.0"]))


def test_signature_is_stable_and_short():
    cfg = compose()
    assert runs.signature(cfg) == runs.signature(compose())
    assert re.fullmatch(r"[0-9a-f]{8}", runs.signature(cfg))  # usable in a dir name as is
    assert runs.signature(cfg, length=12).startswith(runs.signature(cfg))
    # Neither the order of the overrides nor that of the keys in the config changes the cell.
    assert runs.signature(compose(["tau=2", "seed=1"])) == runs.signature(compose(["seed=1", "tau=2"]))
    shuffled = dict(reversed(list(runs.result_config(cfg).items())))
    assert runs.signature(shuffled) == runs.signature(cfg)


@pytest.mark.parametrize(
    "overrides, name",
    [
        (["divergence=fkl", "tau=2"], "fkl-tau2-toy-2x64-s0"),
        (["divergence=rkl", "tau=0.5", "seed=3"], "rkl-tau0.5-toy-2x64-s3"),
        (["loss.kd_ratio=0"], "sft-toy-2x64-s0"),
        (["experiment=teacher"], "sft-toy-4x192-s0"),   # the teacher's SFT names the teacher's sizes
        (["divergence=jsd", "loss.kd_ratio=0.5"], "jsd-tau1-kd0.5-toy-2x64-s0"),
        (["recipe=gpt2-xl_gpt2/teacher"], "sft-gpt2-xl-s0"),
        (["recipe=gpt2-xl_gpt2/student"], "sft-gpt2-s0"),
        (["recipe=gpt2-xl_gpt2/distill", "divergence=rkl", "tau=2"], "rkl-tau2-gpt2-s0"),
        (["model.student.name=null", "model.student.path=/runs/sft-gpt2-s0-1234abcd/student"], "fkl-tau1-sft-gpt2-s0-1234abcd-s0"),
    ],
)
def test_cell_name_is_readable_and_names_the_trained_model(overrides, name):
    assert runs.cell_name(compose(overrides)) == name


def test_how_the_global_batch_is_split_is_not_part_of_the_identity():
    base = ["experiment=smoke", "trainer.global_batch_size=8"]
    one = runs.signature(compose([*base, "trainer.micro_batch_size=8"]))
    assert runs.signature(compose([*base, "trainer.micro_batch_size=2", "trainer.grad_accum=4"])) == one
    assert runs.signature(compose([*base, "trainer.gradient_checkpointing=true", "model.student.name=x"])) == one
    assert runs.signature(compose(["experiment=smoke", "trainer.global_batch_size=16"])) != one


def test_run_dir_is_derived_from_the_config_not_the_clock(tmp_path):
    cfg = compose([f"paths.root={tmp_path}", "sweep_name=demo", "tau=2"])
    d = runs.run_dir(cfg)
    assert d.parent == tmp_path / "demo"
    assert d.name == f"fkl-tau2-toy-2x64-s0-{runs.signature(cfg)}"


def test_is_completed(tmp_path):
    assert not is_completed(tmp_path)
    atomic_write_json(tmp_path / METRICS_FILE, {"status": "failed"})
    assert not is_completed(tmp_path)
    atomic_write_json(tmp_path / METRICS_FILE, {"status": "completed"})
    assert is_completed(tmp_path)
    (tmp_path / METRICS_FILE).write_text("{half")
    assert read_metrics(tmp_path) is None


def test_float_fields_make_tau_and_ratios_floats_but_leave_flags_alone():
    data = {"tau": 2, "loss": {"kd_ratio": 1, "tau_squared": True}, "divergence": {"name": "jsd", "beta": 1, "x": True}}
    out = runs.float_fields(data)
    assert out["tau"] == 2.0 and isinstance(out["tau"], float) and isinstance(out["loss"]["kd_ratio"], float)
    assert isinstance(out["divergence"]["beta"], float) and out["divergence"]["x"] is True
    assert out["loss"]["tau_squared"] is True


def test_result_config_resolves_interpolations():
    cfg = OmegaConf.create({"x": 1, "y": "${x}", "paths": {"root": "/r"}, "logger": {"name": "none"}})
    assert runs.result_config(cfg) == {"x": 1, "y": 1}


def test_unusable_metrics_count_as_unfinished(tmp_path, caplog):
    path = tmp_path / METRICS_FILE
    for garbage in (b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'"completed"', b"{half"):
        path.write_bytes(garbage)
        assert read_metrics(tmp_path) is None and not is_completed(tmp_path)
    assert "counts as unfinished" in caplog.text


def test_a_completed_result_is_never_replaced_by_a_failure(tmp_path):
    assert write_metrics(tmp_path, {"status": "completed", "eval": {}})
    assert not write_metrics(tmp_path, {"status": "failed", "error": "twin"})
    assert not write_metrics(tmp_path, {"status": "interrupted"})
    assert read_metrics(tmp_path)["status"] == "completed"
    assert write_metrics(tmp_path, {"status": "completed", "eval": {"x": 1}})


def test_inputs_join_the_signature_by_content_only():
    cfg = compose()
    a = {"data.train_file": {"path": "/a", "sha256": "1" * 64, "mtime": "t1"}}
    moved = {"data.train_file": {"path": "/b", "sha256": "1" * 64, "mtime": "t2"}}
    edited = {"data.train_file": {"path": "/a", "sha256": "2" * 64, "mtime": "t1"}}
    assert runs.signature(cfg, inputs=a) == runs.signature(cfg, inputs=moved) != runs.signature(cfg)
    assert runs.signature(cfg, inputs=edited) != runs.signature(cfg, inputs=a)
    assert runs.run_dir(cfg, inputs=a).name.endswith(runs.signature(cfg, inputs=a))


def test_labels_tell_rollouts_apart():
    assert rollout_label(None) == "offline" == rollout_label({"name": "offline"})
    assert rollout_label({"name": "on_policy", "lmbda": 0.5, "sampling": SAMPLING}) == "on_policy λ=0.5"
    assert rollout_label({"name": "sgo", "replay_ratio": "decreasing", "init_threshold": 0.0}) == "sgo decreasing"
    assert rollout_label({"name": "on_policy", "lmbda": 1, "sampling": {**SAMPLING, "temperature": 0.7}}) == \
        "on_policy λ=1 temperature=0.7"
