"""`distill-demo`: the paper's experiment at laptop scale, offline, in one command.

    1. teacher       SFT of a 4-layer toy GPT-2 on the embedded task suite (the job with loss.kd_ratio=0)
    2. warm start    SFT of the 2-layer student: the anchors start students from SFT, since pure RKL
                     from a random init collapses and would make the comparison an artefact
    3. the sweep     fkl, rkl, jsd x tau 1, 2, 4 x seeds 0, 1, 2 from the warm start (sweeps/demo.yaml),
                     submitit's local launcher, two cells at a time (one per core), teacher cached once;
                     then the fair baseline: SFT continued from the same warm start for the same steps,
                     one cell per seed (sweeps/demo_sft.yaml), the report's `sft` row
    4. the report    <root>/demo/report.{md,csv,png}

Every stage is `distill-train` itself, so a second run finds the finished teacher, warm start and cells
by their signatures and skips them. `--scale ci` runs the same pipeline at smoke size (one seed, two tau).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from distill import inputs, runs
from distill.train import CONF_DIR

# Scale presets: experiment presets put under every stage's own, overrides for every stage, and the
# sweep grid (command-line sweeps take precedence over the sweep file's).
SCALES = {
    "full": {"base": ["demo"], "overrides": [], "grid": [], "baseline_grid": []},
    "ci": {
        "base": ["demo", "smoke"],
        "overrides": ["trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.progress=false"],
        "grid": ["divergence=fkl,rkl,jsd", "tau=1.0,2.0", "seed=0"],
        "baseline_grid": ["seed=0"],
    },
}


def experiments(*names: str) -> str:
    """`experiment=[a,b,...]`: Hydra merges the presets left to right."""
    return f"experiment=[{','.join(names)}]"


def compose(overrides: list[str]):
    """The config `distill-train` would compose from `overrides` (to find a stage's run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def prep_overrides(root: Path, scale: str = "full") -> dict[str, list[str]]:
    """The overrides of the two prep stages (teacher SFT, student warm start) for `root` and `scale`."""
    preset = SCALES[scale]
    prep = [f"paths.root={root}", "sweep_name=demo-prep", *preset["overrides"]]
    return {
        "teacher": [experiments(*preset["base"], "teacher", "demo_teacher"), *prep],
        "student": [experiments(*preset["base"], "demo_student"), *prep],
    }


def prep_model_dirs(root: Path, scale: str = "full") -> dict[str, Path]:
    """Where the prep stages export their models (`<run_dir>/student`), found by their signatures."""
    return {role: inputs.locate(compose(o))[0] / "student" for role, o in prep_overrides(root, scale).items()}


def run_job(args: list[str]) -> None:
    """Run `distill-train` with `args` as a child process; fail loudly if it fails."""
    cmd = [sys.executable, "-m", "distill.train", *args]
    print("$ distill-train " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def stage(title: str, overrides: list[str]) -> Path:
    """Train (or skip, if finished) one prep cell; return the exported model dir."""
    t0 = time.time()
    print(f"\n== {title}", flush=True)
    run_job(overrides)
    run_dir = inputs.locate(compose(overrides))[0]
    metrics = runs.read_metrics(run_dir) or {}
    scores = {b: round(r["rougeL_mean"], 1) for b, r in metrics.get("eval", {}).items()}
    print(f"== {title}: ROUGE-L {scores}  ({time.time() - t0:.0f} s)", flush=True)
    return run_dir / "student"


def main(argv: list[str] | None = None) -> int:
    """Console entry point `distill-demo`."""
    parser = argparse.ArgumentParser(prog="distill-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.environ.get("DISTILL_OUTPUT", "outputs"),
                        help="output root (default: $DISTILL_OUTPUT or ./outputs)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full",
                        help="full: the README's study; ci: the same pipeline at smoke size")
    parser.add_argument("--parallel", type=int, default=2, help="cells trained at once (default 2: one per core)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.time()
    root = Path(args.root).resolve()
    scale = SCALES[args.scale]
    prep = prep_overrides(root, args.scale)
    teacher = stage("1/4 teacher (SFT, 4 layers)", prep["teacher"])
    student = stage("2/4 student warm start (SFT, 2 layers)", prep["student"])

    print("\n== 3/4 the sweep: divergence x tau x seed, distilled from the warm start", flush=True)
    t_sweep = time.time()
    run_job([
        "-m", "+sweep=demo", experiments(*scale["base"]), f"paths.root={root}", *scale["overrides"],
        f"model.teacher.path={teacher}", f"model.student.path={student}",
        "hydra/launcher=local", f"hydra.sweeper.max_batch_size={args.parallel}", *scale["grid"],
    ])
    # the fair baseline: the same steps of plain SFT from the same warm start (no teacher, tau moot)
    run_job([
        "-m", "+sweep=demo_sft", experiments(*scale["base"]), f"paths.root={root}", *scale["overrides"],
        f"model.student.path={student}", "hydra/launcher=local", f"hydra.sweeper.max_batch_size={args.parallel}",
        *scale["baseline_grid"],
    ])
    print(f"== 3/4 done ({time.time() - t_sweep:.0f} s)", flush=True)

    from distill.report import build_report

    sweep_dir = root / "demo"
    paths = build_report(sweep_dir)
    print(f"\n== 4/4 report: {', '.join(str(p) for p in paths.values())}\n")
    print(Path(paths["report.md"]).read_text())
    print(f"distill-demo finished in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
