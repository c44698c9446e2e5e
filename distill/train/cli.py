"""`distill-train`: the Hydra app. One cell per run (`distill.train.run.run_cell`), a grid with `-m`.

    distill-train divergence=rkl tau=2 model=toy
    distill-train -m divergence=fkl,rkl tau=1,2,4            # a grid
    distill-train -m +sweep=demo hydra/launcher=slurm        # a sweep file on SLURM
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from distill.config import CONF_DIR
from distill.options import CellBusy, ConfigError, InputError
from distill.secrets import secret_overrides
from distill.train.run import run_cell


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_cell(cfg)
    except ConfigError as exc:
        # A bad config or input is the user's to fix: one readable message (the traceback is in the cell's log).
        kind = "cell busy" if isinstance(exc, CellBusy) else "input error" if isinstance(exc, InputError) \
            else "config error"
        print(f"distill-train: {kind}: {exc}", file=sys.stderr)
        sys.exit(2)
    scores = [r["rougeL_mean"] for r in (metrics or {}).get("eval", {}).values()]
    return sum(scores) / len(scores) if scores else None


def main() -> None:
    """Console entry point `distill-train`."""
    # Before Hydra sees them: Hydra would write overrides to .hydra/*.yaml, submitit pickles them and W&B
    # records the command line. A secret given there would land on disk; refuse it with one line.
    secrets = secret_overrides(sys.argv[1:])
    if secrets:
        print(f"distill-train: config error: {', '.join(secrets)} looks like a secret: pass secrets in the environment "
              "(HF_TOKEN, WANDB_API_KEY, ...), never as an override: overrides are written to disk and to W&B",
              file=sys.stderr)
        sys.exit(2)
    _hydra_main()
