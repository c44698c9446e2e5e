"""The peer libraries the benchmarks compare against: which are installed, at which version, and how to ask.

They are an optional dependency group (pyproject.toml: `peers`, and `peers-nodeps` installed with --no-deps), never
needed by the job: TRL (its off-policy distillation trainer), Liger-Kernel (its chunked fused-linear distillation
losses: pure PyTorch on CPU, `liger_kernel.chunked_loss` imports no Triton) and torchtune (its chunked KD loss).
Versions are read from the installed distributions' metadata.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path
from types import ModuleType

# distribution name -> what it is measured for
PEERS = {
    "trl": "GKDTrainer (off-policy distillation trainer)",
    "liger-kernel": "LigerFusedLinearJSDLoss",
    "torchtune": "ForwardKLWithChunkedOutputLoss",
}
INSTALL_HINT = ('`make install`, or: pip install -e ".[peers]", then pip install --no-deps with the "peers-nodeps" '
                'list of pyproject.toml')


def version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(dists=("torch", "transformers", "accelerate", "deepspeed", *PEERS)) -> str:
    """One line 'name version, ...' for the header of a benchmark's output ('missing' where not installed)."""
    return ", ".join(f"{d} {version(d) or 'missing'}" for d in dists)


def require(dist: str) -> None:
    """Fail with one line saying what to install when peer `dist` is missing."""
    if version(dist) is None:
        raise SystemExit(f"{dist} is not installed (needed for the {PEERS.get(dist, dist)} comparison); "
                         f"install the peers extra: {INSTALL_HINT}")


def torchtune_kd_losses() -> ModuleType:
    """torchtune's `modules/loss/kd_losses.py` (ForwardKLWithChunkedOutputLoss and friends: torch only), loaded
    from the installed distribution by file.

    `import torchtune` first requires torchao and imports every torchtune model and dataset; torchao, once
    installed, is imported by transformers in every process (~8 s and CUDA-library warnings per job here), so the
    peers group leaves it out and this reads the one module the benchmark measures.
    """
    spec = importlib.util.find_spec("torchtune")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        require("torchtune")
    path = Path(list(spec.submodule_search_locations)[0]) / "modules" / "loss" / "kd_losses.py"
    mod_spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module
