"""`distill-train`: the Hydra app. One cell per run (`distill.train.run.run_cell`), a grid with `-m`.

    distill-train divergence=rkl tau=2 model=toy
    distill-train -m divergence=fkl,rkl tau=1,2,4            # a grid
    distill-train -m +sweep=demo hydra/launcher=slurm        # a sweep file on SLURM
"""

from __future__ import annotations

import sys
from typing import NoReturn

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from distill.config import CONF_DIR, cell_configs, compose, grid_cells, split_sweep
from distill.files import output_error
from distill.options import CellBusy, ConfigError, InputError, OutputError
from distill.secrets import secret_keys, secret_overrides
from distill.train.run import run_cell


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_cell(cfg)
    except ConfigError as exc:  # OutputError included: it is an OSError too
        _one_line(exc)
    except OSError as exc:  # a write outside the atomic writers (an append) on a full or read-only disk: one line too
        if (err := output_error(exc, exc.filename or cfg.paths.root)) is None:
            raise
        _one_line(err)
    scores = [r["rougeL_mean"] for r in (metrics or {}).get("eval", {}).values()]
    return sum(scores) / len(scores) if scores else None


def _one_line(exc: ConfigError) -> NoReturn:
    """A bad config, input or output is the user's to fix: one readable line and exit 2 (the traceback is in the
    cell's log)."""
    kind = ("cell busy" if isinstance(exc, CellBusy) else "output error" if isinstance(exc, OutputError)
            else "input error" if isinstance(exc, InputError) else "config error")
    print(f"distill-train: {kind}: {exc}", file=sys.stderr)
    sys.exit(2)


def multirun_secrets(argv: list[str]) -> list[str]:
    """Keys of a multirun's cells that hold a secret (from a config file or one sweep choice), found by composing
    every distinct choice of config groups before Hydra writes `<sweep>/multirun.yaml` (it would hold them)."""
    overrides = [a for a in argv if not a.startswith("-")
                 and (not a.lstrip("+~").startswith("hydra") or a.startswith("hydra.searchpath="))]
    try:
        plain, sweeps = split_sweep(overrides)
        try:
            configs = cell_configs(plain, grid_cells(plain, sweeps))
        except HydraException:  # glob(*) and the like need Hydra's own loader: check the base config then
            configs = [compose(plain)]
    except (HydraException, ValueError):
        return []  # a malformed command line: Hydra itself says what is wrong with it
    return sorted({k for cfg in configs for k in secret_keys(OmegaConf.to_container(cfg, resolve=False))})


def main() -> None:
    """Console entry point `distill-train`."""
    # Before Hydra sees them: Hydra would write overrides to multirun.yaml, submitit pickles them and W&B
    # records the command line. A secret given there would land on disk; refuse it with one line.
    argv = sys.argv[1:]
    where = "an override: overrides are"
    secrets = secret_overrides(argv)
    if not secrets and ("-m" in argv or "--multirun" in argv):
        secrets, where = multirun_secrets(argv), "a config: configs are"
    if secrets:
        print(f"distill-train: config error: {', '.join(secrets)} looks like a secret: pass secrets in the environment "
              f"(HF_TOKEN, WANDB_API_KEY, ...), never as {where} written to disk and to W&B", file=sys.stderr)
        sys.exit(2)
    _hydra_main()
