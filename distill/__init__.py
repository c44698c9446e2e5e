"""distill: temperature-swept LLM distillation sweeps (Hydra + DeepSpeed ZeRO + submitit/SLURM + W&B)."""

__version__ = "0.1.0"
