"""`distill-pipeline`: a recipe's study, from the base models to the report, in one command.

    distill-pipeline demo                                    # the embedded demo (what distill-demo runs)
    distill-pipeline gpt2-xl_gpt2 data.dir=/data/minillm --launcher slurm \\
        hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=8
    distill-pipeline gpt2-xl_gpt2 --dry-run                  # where every stage lives, what would run

A recipe (`conf/recipe/<recipe>/`) has three stages, each one `distill-train` config:

    1. teacher   SFT of the teacher (recipe=<recipe>/teacher)            } independent: one after the other
    2. student   SFT warm start of the student (recipe=<recipe>/student) } locally, one SLURM array on SLURM
    3. distill   the divergence x tau x seed grid (recipe=<recipe>/distill, its hydra.sweeper.params), with
                 model.teacher.path / model.student.path set to the exports of stages 1 and 2
       baseline  if the recipe has one (recipe=<recipe>/baseline): SFT continued from the warm start, into
                 the grid's sweep dir (the report's `sft` row); it runs beside the grid, not after it
    4. report    <root>/<distill sweep>/report.{md,csv,png}

The driver composes every stage's config to find its run dir (the signature of its config, never the
clock), skips a stage whose cells are all completed, and otherwise runs it: an unfinished cell resumes
from its checkpoints. It waits for each stage (Hydra's submitit launcher returns when the SLURM array is
done), so run it where it can wait: a terminal multiplexer on a login node, or a small CPU job.
Overrides (`key=value`) apply to every stage; `hydra.*` ones only to the stages run through a launcher.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.options import LAUNCHERS
from distill.cell.results import is_completed, read_metrics
from distill.cell import fingerprints as inputs
from distill.config import CONF_DIR, cell_configs, compose, grid_cells
from distill.report.write import build_report

RECIPE_DIR = CONF_DIR / "recipe"
SFT_STAGES = ("teacher", "student")
GRID_STAGES = ("distill", "baseline")  # launched together once the SFT exports exist
EXAMPLES = """examples:
  distill-pipeline demo                                    # the embedded demo (what distill-demo runs)
  distill-pipeline demo --grid divergence=fkl,rkl,jsd      # the demo with JSD in its grid
  distill-pipeline gpt2-xl_gpt2 --dry-run                  # where every stage lives, what would run
  distill-pipeline gpt2-xl_gpt2 data.dir=/data/minillm --launcher slurm hydra.launcher.partition=gpu
"""


def recipes() -> list[str]:
    """The recipes: the dirs of conf/recipe/ holding the three stages."""
    return sorted(d.name for d in RECIPE_DIR.iterdir()
                  if d.is_dir() and all((d / f"{s}.yaml").is_file() for s in (*SFT_STAGES, "distill")))


@dataclass
class StagePlan:
    """One stage: its overrides, the runs it makes (one per grid cell) and which are completed."""

    name: str
    overrides: list[str]
    cells: list[list[str]] = field(default_factory=list)   # extra overrides per cell ([[]] for an SFT stage)
    run_dirs: list[Path | None] = field(default_factory=list)  # None: not known yet (an input does not exist yet)
    sweep_dir: Path | None = None

    @property
    def done(self) -> list[bool]:
        return [d is not None and is_completed(d) for d in self.run_dirs]

    @property
    def finished(self) -> bool:
        return bool(self.run_dirs) and all(self.done)

    @property
    def export(self) -> Path:
        """The stage's trained model (SFT stages): `<run_dir>/student`."""
        if self.run_dirs[0] is None:
            raise ValueError(f"stage {self.name}: its run dir is not known before its inputs exist")
        return self.run_dirs[0] / "student"


def _split(extra: list[str]) -> tuple[list[str], list[str]]:
    """(config overrides, hydra.* overrides): the latter only make sense under a multirun launcher."""
    hydra = [o for o in extra if o.split("=", 1)[0].lstrip("+~").startswith("hydra.") or o.startswith("hydra/")]
    return [o for o in extra if o not in hydra], hydra


def locate(cfg) -> Path | None:
    """The run dir `distill-train` will give `cfg` (its signature includes its input files' fingerprints,
    distill.cell.fingerprints), or None while an input does not exist yet (a previous stage's export, the data)."""
    try:
        return inputs.locate(cfg)[0]
    except Exception:  # noqa: BLE001 (any unreadable input: the stage is simply not known to be done)
        return None


def plan(recipe: str, root: Path, overrides: list[str] = (), grid: list[str] = (),
         baseline_grid: list[str] = ()) -> dict[str, StagePlan]:
    """Every stage of `recipe` under `root`: overrides, cells, run dirs. Pure bookkeeping: runs nothing."""
    if recipe not in recipes():
        raise ValueError(f"unknown recipe {recipe!r}: choose one of {', '.join(recipes())} (conf/recipe/)")
    config_overrides, _ = _split(list(overrides))
    common = [f"paths.root={root}", *config_overrides]
    stages: dict[str, StagePlan] = {}
    for name in SFT_STAGES:
        o = [f"recipe={recipe}/{name}", *common]
        cfg = compose(o)
        stages[name] = StagePlan(name, o, [[]], [locate(cfg)], Path(cfg.paths.sweep_dir))
    if any(stages[s].run_dirs[0] is None for s in SFT_STAGES):
        return stages  # the grid needs the SFT exports: planned again once those stages ran
    distill = [f"recipe={recipe}/distill", *common, f"model.teacher.path={stages['teacher'].export}",
               f"model.student.path={stages['student'].export}"]
    cells = grid_cells(distill, list(grid))
    configs = cell_configs(distill, cells)
    stages["distill"] = StagePlan("distill", distill, cells, [locate(c) for c in configs],
                                  Path(configs[0].paths.sweep_dir))
    if (RECIPE_DIR / recipe / "baseline.yaml").is_file():
        base = [f"recipe={recipe}/baseline", *common, f"model.student.path={stages['student'].export}"]
        cells = grid_cells(base, list(baseline_grid))
        configs = cell_configs(base, cells)
        stages["baseline"] = StagePlan("baseline", base, cells, [locate(c) for c in configs],
                                       Path(configs[0].paths.sweep_dir))
    return stages


def train_command(overrides: list[str], *, multirun: bool = False) -> list[str]:
    """The `distill-train` process for these overrides (`-m`: through the configured launcher)."""
    return [sys.executable, "-m", "distill.train", *(["-m"] if multirun else []), *overrides]


def commands(stages: dict[str, StagePlan], *, launcher: str, parallel: int, grid: list[str],
             hydra_overrides: list[str], baseline_grid: list[str] = ()) -> list[tuple[str, list[str]]]:
    """(title, command) of every unfinished stage, in order. Locally the SFT stages run one after the other
    as plain jobs, the grid in a pool of `parallel` worker processes (hydra/launcher=pool), each running
    cell after cell, and the baseline in a pool of one beside it; on SLURM the two SFT stages are one job
    array (a multirun over the recipe's stage), the grid another and the baseline a third."""
    out: list[tuple[str, list[str]]] = []
    todo = [s for s in SFT_STAGES if not stages[s].finished]
    if launcher == "local":
        for s in todo:
            out.append((s, train_command(stages[s].overrides)))
    elif todo:
        recipe_choice = ",".join(stages[s].overrides[0].split("=", 1)[1] for s in todo)
        common = stages[todo[0]].overrides[1:]
        out.append(("+".join(todo), train_command([f"recipe={recipe_choice}", *common, f"hydra/launcher={launcher}",
                                                   *hydra_overrides], multirun=True)))
    for name, cells, n_jobs in (("distill", list(grid), parallel), ("baseline", list(baseline_grid), 1)):
        local = ["hydra/launcher=pool", f"hydra.launcher.n_jobs={n_jobs}"] if launcher == "local" else \
            [f"hydra/launcher={launcher}"]
        if name in stages and not stages[name].finished:
            out.append((name, train_command([*stages[name].overrides, *cells, *local, *hydra_overrides], multirun=True)))
    return out


def scores(run_dir: Path) -> dict[str, float]:
    """A finished cell's ROUGE-L per benchmark (empty if it has none)."""
    metrics = read_metrics(run_dir) or {}
    return {b: round(r["rougeL_mean"], 1) for b, r in metrics.get("eval", {}).items()}


def describe(stages: dict[str, StagePlan]) -> str:
    """One line per stage: where it lives and how many of its cells are completed."""
    lines = []
    for s in stages.values():
        done = sum(s.done)
        where = s.run_dirs[0] if len(s.run_dirs) == 1 else f"{s.sweep_dir}/ ({len(s.run_dirs)} cells)"
        lines.append(f"  {s.name:8s} {done}/{len(s.run_dirs)} completed  {where}")
    return "\n".join(lines)


def run_pipeline(recipe: str, root: str | os.PathLike, *, overrides: list[str] = (), grid: list[str] = (),
                 baseline_grid: list[str] = (), launcher: str = "local", parallel: int = 2, dry_run: bool = False,
                 log: Any = print) -> dict[str, Any]:
    """Run (or resume) every unfinished stage of `recipe`, then the report. Returns the stage plans and the
    report's paths. A stage that fails stops the pipeline (CalledProcessError), after the grid's report."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    root = Path(root).resolve()
    _, hydra_overrides = _split(list(overrides))
    stages = plan(recipe, root, overrides, grid, baseline_grid)
    log(f"distill-pipeline {recipe}: {root}\n{describe(stages)}")
    todo = commands(stages, launcher=launcher, parallel=parallel, grid=list(grid), hydra_overrides=hydra_overrides,
                    baseline_grid=list(baseline_grid))
    skipped: set[str] = set()

    def log_skips() -> None:
        for stage in stages.values():
            if stage.finished and stage.name not in skipped:
                skipped.add(stage.name)
                log(f"== {stage.name}: every cell already completed, skipped")

    log_skips()
    if dry_run:
        for title, cmd in todo:
            log(f"== {title} would run: distill-train {' '.join(cmd[3:])}")
        if "distill" not in stages:
            log("== distill: planned once the SFT stages' exports exist")
        return {"stages": stages, "report": None}
    _run_stages([t for t in todo if t[0] not in GRID_STAGES], stages, log)
    stages = plan(recipe, root, overrides, grid, baseline_grid)  # the exports exist now: the grid's cells and dirs
    if "distill" not in stages:
        raise ValueError("the SFT stages ran, yet their run dirs cannot be located (see their train.log)")
    log_skips()
    todo = [t for t in commands(stages, launcher=launcher, parallel=parallel, grid=list(grid),
                                hydra_overrides=hydra_overrides, baseline_grid=list(baseline_grid))
            if t[0] in GRID_STAGES]
    failure = _run_stages(todo, stages, log)
    report = build_report(stages["distill"].sweep_dir)
    log(f"\n== report: {', '.join(str(p) for p in report.values())}")
    if failure is not None:
        raise failure
    return {"stages": stages, "report": report}


def _run_stages(todo: list[tuple[str, list[str]]], stages: dict[str, StagePlan],
                log: Any) -> subprocess.CalledProcessError | None:
    """Run the SFT stages one after the other, then the grid and the baseline at once (independent multiruns:
    the baseline's few one-worker cells fill the cores the grid leaves idle, and on SLURM both arrays queue
    together). An SFT stage that fails raises (nothing after it can run); a grid that fails is returned, so
    that the report (which lists the failed cells) is still written."""
    for title, cmd in [t for t in todo if t[0] not in GRID_STAGES]:
        t0 = time.time()
        log(f"\n== {title}: $ distill-train {' '.join(cmd[3:])}")
        subprocess.run(cmd, check=True)
        log(f"== {title}: done in {time.time() - t0:.0f} s")
        for name in title.split("+"):
            if stages[name].run_dirs[0] is not None:
                log(f"   {name} ROUGE-L: {scores(stages[name].run_dirs[0])}")
    running = []
    for title, cmd in [t for t in todo if t[0] in GRID_STAGES]:
        log(f"\n== {title}: $ distill-train {' '.join(cmd[3:])}")
        running.append((title, cmd, time.time(), subprocess.Popen(cmd)))
    failure = None
    while running:  # each stage's end is logged when it comes, whichever comes first
        time.sleep(0.2)
        ended = [r for r in running if r[3].poll() is not None]
        running = [r for r in running if r not in ended]
        for title, cmd, t0, proc in ended:
            if proc.returncode != 0 and failure is None:
                failure = subprocess.CalledProcessError(proc.returncode, cmd)
            log(f"== {title}: {'done' if proc.returncode == 0 else f'failed (exit {proc.returncode})'} in "
                f"{time.time() - t0:.0f} s")
    return failure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="distill-pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=EXAMPLES + "\nrecipes: " + ", ".join(recipes()))
    parser.add_argument("recipe", help="a dir of conf/recipe/ (e.g. demo, gpt2-xl_gpt2)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    parser.add_argument("--root", default=os.environ.get("DISTILL_OUTPUT", "outputs"),
                        help="output root (default: $DISTILL_OUTPUT or ./outputs)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=A,B",
                        help="replace the recipe's grid along KEY (repeatable), e.g. --grid tau=1.0,2.0")
    parser.add_argument("--baseline-grid", action="append", default=[], metavar="KEY=A,B",
                        help="replace the baseline stage's grid along KEY (recipes with a baseline stage)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local (this machine) or a SLURM launcher of conf/hydra/launcher/")
    parser.add_argument("--parallel", type=int, default=2, help="local launcher: grid cells trained at once")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and the commands, run nothing")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console entry point `distill-pipeline`."""
    from hydra.errors import HydraException

    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run_pipeline(args.recipe, args.root, overrides=args.overrides, grid=args.grid,
                     baseline_grid=args.baseline_grid, launcher=args.launcher, parallel=args.parallel,
                     dry_run=args.dry_run)
    except (ValueError, HydraException) as exc:
        print(f"distill-pipeline: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"distill-pipeline: a stage failed (exit {exc.returncode}); rerun the same command to resume",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
