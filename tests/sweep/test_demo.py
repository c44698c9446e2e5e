"""distill-demo is the `demo` recipe of distill-pipeline (its end-to-end run: tests/test_pipeline.py)."""

from pathlib import Path

from omegaconf import OmegaConf

from distill.sweep import demo as demo
from distill.sweep import pipeline as pipeline
from tests.conftest import compose


def test_the_demo_sweep_file_is_the_demo_recipes_grid_stage():
    """`+sweep=demo` names the recipe's third stage: the same config, so the same cells (the prep stages'
    signatures are pinned in tests/cell/test_golden_signatures.py)."""
    assert OmegaConf.to_container(compose(["recipe=demo/distill"]), resolve=True) == \
        OmegaConf.to_container(compose(["+sweep=demo"]), resolve=True)


def test_distill_demo_runs_the_demo_recipe_locally(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(recipe, root, **kw):
        calls.append((recipe, Path(root), kw))
        report = tmp_path / "report.md"
        report.write_text("| fkl | ... |\n")
        return {"report": {"report.md": report}}

    monkeypatch.setattr(demo, "run_pipeline", fake_run)
    assert demo.main(["--root", str(tmp_path), "--scale", "ci", "--parallel", "3"]) == 0
    [(recipe, root, kw)] = calls
    assert recipe == "demo" and root == tmp_path and kw["launcher"] == "local" and kw["parallel"] == 3
    assert kw["grid"] == demo.SCALES["ci"]["grid"] and "distill-demo finished" in capsys.readouterr().out


def test_prep_model_dirs_are_the_pipelines_sft_exports(tmp_path):
    dirs = demo.prep_model_dirs(tmp_path)
    stages = pipeline.plan("demo", tmp_path)
    assert dirs == {"teacher": stages["teacher"].export, "student": stages["student"].export}
    assert dirs["teacher"].parent.name.startswith("sft-toy-4x128-s0-")
