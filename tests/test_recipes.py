"""The recipes (conf/recipe/<pair>/<stage>.yaml) compose, and their values are docs/recipes.md's table."""

from __future__ import annotations

import functools
import re

import pytest

from distill.cell import identity as runs
from distill.config import CONF_DIR, compose

ROOT = CONF_DIR.parent

STAGES = ("teacher", "student", "distill")
SELECTION = {"dev ROUGE-L": "rougeL", "dev loss": "loss"}


def _section(title: str) -> str:
    text = (ROOT / "docs" / "recipes.md").read_text()
    start = text.index(title)
    return text[start:text.index("\n## ", start + 1)]


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the first markdown table whose header starts with `header_start`."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


RECIPES_PAGE = _section("## The real study: recipes")
RECIPE_ROWS = _table_rows(RECIPES_PAGE, "| recipe | stage |")
SHARED = dict(zip(
    [c.strip() for c in next(ln for ln in RECIPES_PAGE.splitlines() if ln.startswith("| warmup |")).strip("|").split("|")],
    _table_rows(RECIPES_PAGE, "| warmup |")[0],
))


@functools.lru_cache(maxsize=None)
def _composed(name: str):
    return compose([f"recipe={name}"])


def _recipe_text(name: str) -> str:
    """The stage's YAML, following a one-line `defaults: [/recipe/...]` reuse of another recipe's stage."""
    text = (CONF_DIR / "recipe" / f"{name}.yaml").read_text()
    reused = re.search(r"^  - /recipe/(\S+)$", text, re.M)
    return text + (_recipe_text(reused.group(1)) if reused else "")


def _anchor_stages() -> list[str]:
    """Every stage of the paper-pair recipes (the `demo` recipe is the embedded study, not an anchor's)."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in (CONF_DIR / "recipe").glob("*/*.yaml") if p.parent.name != "demo")


def test_every_recipe_stage_is_in_the_table_and_every_row_is_a_recipe():
    on_disk = set(_anchor_stages())
    in_table = {f"{row[0].strip('`')}/{row[1]}" for row in RECIPE_ROWS}
    assert on_disk == in_table and len(in_table) == len(RECIPE_ROWS) == 21
    pairs = {row[0].strip("`") for row in RECIPE_ROWS}
    assert {f"{p}/{s}" for p in pairs for s in STAGES} == in_table


@pytest.mark.parametrize("row", RECIPE_ROWS, ids=lambda r: f"{r[0].strip('`')}/{r[1]}")
def test_recipe_composes_to_the_readme_values(row):
    pair, stage, trains, lr, gbs, mbs, epochs, zero, precision, selected, anchor = row
    name = f"{pair.strip('`')}/{stage}"
    cfg = _composed(name)
    t = cfg.trainer
    assert cfg.model.student.name == trains
    assert float(t.lr) == float(lr)
    assert (t.global_batch_size, t.micro_batch_size, t.epochs, t.zero_stage) == (int(gbs), int(mbs), int(epochs), int(zero))
    assert t.max_steps is None  # trained by epochs, as the scripts
    assert t.precision == precision and t.select == SELECTION[selected]
    # stage semantics: SFT stages train without a teacher; distillation starts from a warm start
    assert (float(cfg.loss.kd_ratio) == 0.0) == (stage != "distill")
    # the anchor script is named in the YAML, beside the values
    script = re.search(r"`(\S+\.sh)`", anchor).group(1)
    text = _recipe_text(name)
    assert f"# Anchor: {anchor.split(' ')[0]} {script}" in text
    assert text.count(script) >= 5, "lr, batch, epochs and ZeRO stage each cite the script"


@pytest.mark.parametrize("name", _anchor_stages())
def test_shared_values_are_the_readme_values(name):
    cfg = _composed(name)
    t, d = cfg.trainer, cfg.data
    assert t.warmup_steps == int(SHARED["warmup"])
    assert SHARED["LR schedule"] == f"cosine to {float(t.min_lr):g}"
    assert SHARED["weight decay"].startswith(f"{t.weight_decay:g} ") and "bias" in t.no_decay
    assert SHARED["AdamW betas"] == ", ".join(f"{b:g}" for b in t.betas)
    assert float(SHARED["grad clip"]) == t.grad_clip
    assert SHARED["max length / prompt"] == f"{d.max_length} / {d.max_prompt_length}"
    assert SHARED["evaluation"] == "every epoch" and t.eval_every == "epoch"
    # data=dolly_minillm: MiniLLM's released files and split
    assert SHARED["data"] == "`dolly_minillm`" and d.train_file.endswith("dolly/raw.jsonl") and d.long_prompts == "drop"


def test_a_pairs_stages_share_one_teacher_and_distil_from_named_models():
    teachers = {runs.signature(_composed(f"{p}/teacher")) for p in ("gpt2-xl_gpt2", "gpt2-xl_gpt2-medium",
                                                                            "gpt2-xl_gpt2-large")}
    assert len(teachers) == 1  # one GPT-2 XL SFT serves the three students
    distill = _composed("gpt2-xl_gpt2/distill")
    assert (distill.model.teacher.name, distill.model.student.name) == ("gpt2-xl", "gpt2")
    assert distill.model.teacher.path is None and distill.model.student.path is None  # filled in by the pipeline
