"""The peer libraries the benchmarks compare against: which are installed, at which version, and how to ask.

They are an optional dependency group (`pip install -e ".[peers]"`, see pyproject.toml), never needed by the job:
TRL (its off-policy distillation trainer), Liger-Kernel (its chunked fused-linear distillation losses, pure PyTorch
on CPU: no Triton is needed for `liger_kernel.chunked_loss`) and torchtune (its chunked KD loss; its package import
needs torchao, sentencepiece and tiktoken). Versions are read from the installed distributions' metadata, without
importing them (importing torchtune alone costs ~10 s of CPU here).
"""

from __future__ import annotations

from importlib import metadata

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


def versions(dists=("torch", "transformers", "accelerate", "deepspeed", *PEERS, "torchao")) -> str:
    """One line 'name version, ...' for the header of a benchmark's output ('missing' where not installed)."""
    return ", ".join(f"{d} {version(d) or 'missing'}" for d in dists)


def require(dist: str) -> None:
    """Fail with one line saying what to install when peer `dist` is missing."""
    if version(dist) is None:
        raise SystemExit(f"{dist} is not installed (needed for the {PEERS.get(dist, dist)} comparison); "
                         f"install the peers extra: {INSTALL_HINT}")
