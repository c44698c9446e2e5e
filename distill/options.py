"""The allowed values of every option, and the error types: one home, no heavy imports.

The config checks (distill.config), the code that implements each option and the report all read them from
here, so a new divergence, rollout or cache form is named once. Nothing here imports torch or any other
part of distill.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------- objectives
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "ab")  # divergence.name (distill.losses)
SFT = "sft"               # the report's name of a kd_ratio=0 cell: cross-entropy only, no teacher, tau moot
OBJECTIVE_ORDER = (SFT, *DIVERGENCES)  # the order the report lists objectives in
TAU_TARGETS = ("both", "teacher")      # loss.tau_target: soften both distributions, or the teacher's only
LOSS_IMPLS = ("plain", "chunked", "fused")  # loss.impl; "fused" takes hidden states, not logits

# ---------------------------------------------------------------------------------------------- teachers
CACHE_KINDS = ("hidden", "logits", "topk")                # what the teacher cache stores
CACHE_SETTINGS = (False, True, "auto", "hidden", "logits")  # loss.teacher_cache (topk: loss.teacher_cache_topk)

# ---------------------------------------------------------------------------------------------- rollouts
ROLLOUTS = ("offline", "on_policy", "sgo", "seq_kd")       # rollout.name
REPLAY_RATIOS = ("decreasing", "constant", "increasing")   # rollout.replay_ratio (DistiLLM `--replay-ratio`)

# ---------------------------------------------------------------------------------------------- data
DATA_FORMATS = ("jsonl", "dolly", "selfinst", "vicuna", "sinst", "uninst")  # data.format / benchmark formats
TEMPLATES = ("alpaca", "alpaca_compact", "alpaca_qwen", "chat")            # data.template
TRUNCATION_SIDES = ("left", "right")                                       # data.truncation_side
LONG_PROMPT_POLICIES = ("truncate", "drop")                                # data.long_prompts

# ---------------------------------------------------------------------------------------------- training
ZERO_STAGES = (0, 1, 2, 3)             # trainer.zero_stage
PRECISIONS = ("fp32", "bf16", "fp16")  # trainer.precision / model.dtype (fp16: GPU only)
SELECTIONS = ("last", "loss", "rougeL")  # trainer.select: which evaluation's checkpoint is the result
EPOCH = "epoch"                          # trainer.eval_every / ckpt_every: once per epoch
ON_CHANGE = ("rerun", "error")           # inputs.on_change

# ---------------------------------------------------------------------------------------------- sweeps
LAUNCHERS = ("local", "slurm", "slurm_cpu")         # distill-pipeline --launcher
JOB_TYPES = ("teacher-sft", "student-sft", "distill")  # logger.job_type (W&B)
WANDB_MODES = ("offline", "online", "disabled")     # logger.mode


# ---------------------------------------------------------------------------------------------- errors
class ConfigError(ValueError):
    """A composed config that cannot run; the message lists every problem, one per line."""


class InputError(ConfigError):
    """Something the config points at cannot be used (a data file, a model dir, a checkpoint, the output dir).

    Like a config error it is the user's to fix: the job says what was wrong and what would be right in one
    line and exits with status 2 (the traceback goes to the cell's log).
    """


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded safely (a `latest` naming no checkpoint, a file the weights-only
    loader refuses): nothing is loaded."""


class CellBusy(InputError):
    """Another live process runs this cell; this run did nothing."""


class LockLost(CellBusy):
    """This run's cell lock was taken over (it was judged dead): it stops without writing a result."""


class OutputError(InputError, OSError):
    """A result file, checkpoint or export cannot be written: no space left, over quota, a read-only or forbidden
    dir (distill.files.output_error). One line naming the path and what to do; nothing half-written stays. Still
    an OSError (with its errno), so code that tolerates a failed write (a memo, a lock record) goes on doing so."""


class TrainingDiverged(InputError):
    """The training loss or gradient norm of a step is not finite (NaN, inf): the cell stops at that step,
    failed, with one line naming the step, the value and what to try (a lower trainer.lr)."""
