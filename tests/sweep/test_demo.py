"""distill-demo is the `demo` recipe of distill-pipeline (its end-to-end run: tests/test_pipeline.py)."""

from pathlib import Path

from distill.sweep import demo as demo
from distill.sweep import pipeline as pipeline
from tests.conftest import compose


def test_demo_recipe_composes_the_demo_presets_exactly(tmp_path):
    """The recipe's stages are the former experiment presets: the same configs, so the same cells and results."""
    from omegaconf import OmegaConf

    pairs = [(["recipe=demo/teacher"], ["experiment=[demo,teacher,demo_teacher]", "sweep_name=demo-prep"]),
             (["recipe=demo/student"], ["experiment=[demo,demo_student]", "sweep_name=demo-prep"]),
             (["recipe=demo/distill"], ["+sweep=demo"])]
    for new, old in pairs:
        assert OmegaConf.to_container(compose(new), resolve=True) == OmegaConf.to_container(compose(old), resolve=True)


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
