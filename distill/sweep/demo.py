"""`distill-demo`: the paper's experiment at laptop scale, offline, in one command: the `demo` recipe of
`distill-pipeline` (conf/recipe/demo/), run on this machine.

    1. teacher       SFT of a 4-layer toy GPT-2 on the embedded task suite (the job with loss.kd_ratio=0)
    2. warm start    SFT of the 2-layer student: the anchors start students from SFT, since pure RKL
                     from a random init collapses and would make the comparison an artefact
    3. the sweep     fkl, rkl x tau 1, 2, 4 x seeds 0, 1, 2 from the warm start, in two worker
                     processes that run cell after cell (one per core; hydra/launcher=pool), teacher
                     cached once; beside it the fair baseline: SFT continued from the same warm start for
                     the same steps, one cell per seed (conf/recipe/demo/baseline.yaml), the report's `sft` row
    4. the report    <root>/demo/report.{md,csv,png}

A second run finds the finished teacher, warm start and cells by their signatures and skips them.
`--scale ci` runs the same pipeline at smoke size (one seed, two tau).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from distill.config import compose
from distill.sweep.pipeline import locate, plan, run_pipeline, train_command

RECIPE = "demo"
EXAMPLES = """examples:
  distill-demo                          # the study under ./outputs (or $DISTILL_OUTPUT); reruns skip what is done
  distill-demo --root /scratch/demo     # somewhere else
  distill-demo --scale ci               # the same pipeline at smoke size (the end-to-end check)
"""
# Scale presets: overrides for every stage (experiment presets go on top of the recipe) and the grid.
SCALES = {
    "full": {"overrides": [], "grid": [], "baseline_grid": []},
    "ci": {  # experiment=smoke's sizes, spelled out so the teacher and the student stay apart (4x64 vs 2x64)
        "overrides": [
            "data.generator.n_train=256", "data.generator.n_valid=32", "data.generator.n_test=16",
            "data.generator.n_shift=16", "data.tokenizer_vocab_size=320", "data.max_length=96",
            "data.max_prompt_length=64", "model.teacher.n_embd=64", "trainer.max_steps=6", "trainer.ckpt_every=3",
            "trainer.log_every=2", "trainer.eval_every=3", "trainer.val_batches=1", "trainer.progress=false",
            "eval.seeds=[10]", "eval.max_examples=8", "eval.batch_size=8", "eval.max_new_tokens=16", "logger=none",
        ],
        "grid": ["divergence=fkl,rkl", "tau=1.0,2.0", "seed=0"],
        "baseline_grid": ["seed=0"],
    },
}


def prep_model_dirs(root: Path, scale: str = "full") -> dict[str, Path]:
    """Where the prep stages export their models (`<run_dir>/student`), found by their signatures."""
    stages = plan(RECIPE, Path(root), SCALES[scale]["overrides"], SCALES[scale]["grid"], SCALES[scale]["baseline_grid"])
    return {role: stages[role].export for role in ("teacher", "student")}


def prep_overrides(root: Path, scale: str = "full") -> dict[str, list[str]]:
    """The overrides of the two prep stages (teacher SFT, student warm start) for `root` and `scale`."""
    stages = plan(RECIPE, Path(root), SCALES[scale]["overrides"], SCALES[scale]["grid"], SCALES[scale]["baseline_grid"])
    return {role: stages[role].overrides for role in ("teacher", "student")}


def stage(title: str, overrides: list[str]) -> Path:
    """Train (or skip, if finished) one prep cell as `distill-train` does; return its exported model dir."""
    print(f"\n== {title}", flush=True)
    subprocess.run(train_command(overrides), check=True)
    return locate(compose(overrides)) / "student"


def main(argv: list[str] | None = None) -> int:
    """Console entry point `distill-demo`."""
    parser = argparse.ArgumentParser(prog="distill-demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    parser.add_argument("--root", default=os.environ.get("DISTILL_OUTPUT", "outputs"),
                        help="output root (default: $DISTILL_OUTPUT or ./outputs)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full",
                        help="full: the README's study; ci: the same pipeline at smoke size")
    parser.add_argument("--parallel", type=int, default=2, help="cells trained at once (default 2: one per core)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.time()
    scale = SCALES[args.scale]
    result = run_pipeline(RECIPE, args.root, overrides=scale["overrides"], grid=scale["grid"],
                          baseline_grid=scale["baseline_grid"], launcher="local", parallel=args.parallel)
    print("\n" + Path(result["report"]["report.md"]).read_text())
    print(f"distill-demo finished in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
