"""Helpers of the train tests: the exported student's weights, the environment of a child `distill-train`."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a cell's exported student (`<run_dir>/student/model.safetensors`)."""
    return load_file(str(run_dir / "student" / "model.safetensors"))


def child_env() -> dict[str, str]:
    """The environment of a child process running the job: offline W&B and hub, one thread, no inherited rank."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return env
