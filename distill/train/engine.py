"""DeepSpeed at the edge: distributed env, engine config, checkpoints, export.

The job runs the same way as one plain process, under torchrun, and as N tasks under submitit/SLURM:
`setup_distributed` fills in whatever environment the launcher did not, then DeepSpeed takes over.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from distill.config import BatchPlan, batch_plan
from distill.options import CheckpointError, OutputError
from distill.files import atomic_path, atomic_write_text, output_error

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
CKPT_TAG = re.compile(r"^step\d{8}$")  # the tags save_checkpoint writes; `latest` must name one


def _in_submitit_job() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ or "SUBMITIT_FOLDER" in os.environ


def setup_distributed(timeout_s: int = 300) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed once per process; return (rank, world_size).

    Env precedence: an existing process group; torchrun's RANK/WORLD_SIZE; submitit's job environment
    (SLURM or local executor) of several tasks; else a single process whose store port the OS picks.
    """
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ and _in_submitit_job():
        import submitit

        job = submitit.helpers.TorchDistributedEnvironment()
        if job.world_size > 1:
            job.export(set_cuda_visible_devices=False, overwrite=True)
    if "RANK" not in os.environ:
        # One process meets only itself at the rendezvous, so port 0 lets the OS pick a free port as the store binds.
        # Any port chosen beforehand can be taken first: submitit derives one from the job id (or an inherited
        # MASTER_PORT), and a probed free port is free only until the probe closes (EADDRINUSE seen in CI).
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    if not torch.cuda.is_available():
        # The shared-memory comm op JIT-compiles for a minute on first use; gloo needs nothing compiled.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        auto_mpi_discovery=False,
        timeout=_dt.timedelta(seconds=timeout_s),
        verbose=False,
    )
    return dist.get_rank(), dist.get_world_size()


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def deepspeed_config(trainer: Mapping[str, Any], plan: BatchPlan) -> dict:
    """The DeepSpeed JSON for the student: batch split, ZeRO stage, precision, torch AdamW (nothing JIT-compiled)."""
    precision = trainer["precision"]
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": float(trainer["grad_clip"]),
        "zero_optimization": {"stage": int(trainer["zero_stage"])},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(trainer["lr"]),
                "betas": list(trainer["betas"]),
                "weight_decay": float(trainer["weight_decay"]),
                "torch_adam": True,  # FusedAdam/CPUAdam would JIT-compile for minutes on CPU
                # torch's per-tensor Adam loop (its CPU default) was ~25% of a toy step; foreach batches it.
                "foreach": True,
            },
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "wandb": {"enabled": False},  # tracking is ours (distill.tracking), rank 0 only
    }
    if int(trainer["zero_stage"]) == 3:
        # Export needs full weights; gather them into the 16-bit state dict at save time.
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, then cosine down to `min_lr_ratio` x peak at `max_steps`: transformers' curve
    (`get_cosine_with_min_lr_schedule_with_warmup`), read one step ahead during the warmup.

    transformers' warmup trains its first step at lr 0 (factor step / warmup); ours trains it at peak / warmup
    and reaches the peak on the last warmup step, so no step is spent at lr 0 (with warmup_steps=1, the
    smoke preset's, none would be trained at all). After the warmup both are the same curve.
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only to obtain the curve
    curve = get_cosine_with_min_lr_schedule_with_warmup(
        probe, num_warmup_steps=warmup_steps, num_training_steps=max_steps, min_lr_rate=min_lr_ratio).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(_warmup_one_step_ahead, curve=curve, warmup_steps=warmup_steps))


def _warmup_one_step_ahead(step: int, *, curve: Callable[[int], float], warmup_steps: int) -> float:
    return curve(step + 1 if step < warmup_steps else step)


def min_lr_ratio(trainer: Mapping[str, Any]) -> float:
    """The cosine floor as a fraction of the peak: `min_lr` / `lr` when an absolute floor is set."""
    if trainer.get("min_lr") is not None:
        return float(trainer["min_lr"]) / float(trainer["lr"])
    return float(trainer["min_lr_ratio"])


def parameter_groups(model: torch.nn.Module, no_decay: Sequence[str]) -> list:
    """Trainable parameters, split as the anchors do (utils.get_optimizer_params): names containing any of
    `no_decay` get weight decay 0. With no such names, one plain list (the optimizer's own weight decay)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay:
        return [p for _, p in params]
    exempt = [p for n, p in params if any(key in n for key in no_decay)]
    decay = [p for n, p in params if not any(key in n for key in no_decay)]
    return [g for g in ({"params": decay}, {"params": exempt, "weight_decay": 0.0}) if g["params"]]


def initialize(model: torch.nn.Module, trainer: Mapping[str, Any], world_size: int, *,
               max_steps: int | None = None, plan: BatchPlan | None = None):
    """`deepspeed.initialize` the student with its optimizer and warmup+cosine schedule over `max_steps`
    (default `trainer.max_steps`), its batch split by `plan` (default: `batch_plan(trainer, world_size)`)."""
    import deepspeed

    plan = plan or batch_plan(trainer, world_size)
    total = int(max_steps if max_steps is not None else trainer["max_steps"])
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, list(trainer.get("no_decay") or [])),
        lr_scheduler=lambda opt: lr_schedule(opt, int(trainer["warmup_steps"]), total, min_lr_ratio(trainer)),
        config=deepspeed_config(trainer, plan),
    )
    # DeepSpeed's own loader unpickles with weights_only=False: a file planted in a cell dir would run
    # code on resume. Every load of this engine (module, optimizer, ZeRO shards) goes through ours.
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
    return engine


def frozen_zero3_config(trainer: Mapping[str, Any]) -> dict:
    """The DeepSpeed JSON for a frozen model partitioned across ranks (ZeRO-3 inference): no optimizer."""
    precision = trainer["precision"]
    return {
        "train_micro_batch_size_per_gpu": int(trainer["micro_batch_size"]),
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wandb": {"enabled": False},
    }


@contextlib.contextmanager
def zero3_loading(ds_config: dict):
    """While open, `from_pretrained` builds models under `deepspeed.zero.Init`: each rank materialises only its
    partition of the weights, so a teacher larger than one device's memory can be loaded."""
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = HfDeepSpeedConfig(ds_config)  # transformers keeps a weak reference: alive while this lives
    try:
        yield
    finally:
        del hf_config


def shard_frozen(model: torch.nn.Module, trainer: Mapping[str, Any]):
    """Partition a frozen model (the teacher) across ranks with ZeRO-3 inference; return its DeepSpeed engine.

    Use `engine.module` for forwards: parameters are gathered layer by layer for each forward and released
    after, so every rank must run the same number of forwards. Keep the engine alive as long as the model.
    """
    import deepspeed

    model.requires_grad_(False).eval()
    engine, _, _, _ = deepspeed.initialize(model=model, config=frozen_zero3_config(trainer))
    engine.module.eval()
    return engine


def call_as_forward(module: torch.nn.Module, fn, *args):
    """`fn(*args)` run as `module`'s forward.

    A loss that reads a module's parameters outside that module's forward (the fused loss reading the
    student's output head) gets, this way, what ZeRO-3 gives any forward: the module's partitioned parameters
    gathered for the call, gathered again for its backward, and their gradients reduced into the partitions.
    Under ZeRO 0-2 it is a plain call.
    """
    own = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The tag dir of the checkpoint after `step` steps (other state, e.g. a rollout's, may be saved in it)."""
    return Path(run_dir) / CKPT_DIR / f"step{step:08d}"


def _allowed_globals() -> list:
    """The only non-tensor objects DeepSpeed pickles into its checkpoints (measured at ZeRO 0-3, fp32/bf16).

    Torch's weights-only unpickler rebuilds these plain records and this enum without running code;
    anything else in a checkpoint file is refused.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | os.PathLike, map_location: Any = None, mmap: bool = False) -> Any:
    """`torch.load` with weights_only=True and the DeepSpeed allowlist; CheckpointError on any refusal.

    The error says why in distill's words: torch's own message (kept out of the chain, so out of the cell's log
    too) offers `weights_only=False`, the very load that would run whatever the file pickled.
    """
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as exc:  # UnpicklingError for planted objects; RuntimeError/EOFError for corrupt files
            raise CheckpointError(f"{path}: not a weights-only checkpoint written by distill ({_refusal(exc)})") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch's message sets a phrase in bold
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: ([^\n]*?)(?:\. Please|\n|$)")


def _refusal(exc: Exception) -> str:
    """Why the weights-only loader refused a file, one short phrase that never suggests the unsafe load."""
    text = _ANSI.sub("", str(exc))
    if found := _UNSAFE_GLOBAL.search(text):
        return f"it pickles {found.group(1)}, which only a loader that runs the file's code would rebuild"
    if found := _UNPICKLER_ERROR.search(text):
        return f"the weights-only unpickler refused it: {found.group(1).strip()}"
    if "_use_new_zipfile_serialization" in text:  # torch.save and DeepSpeed write the zip format (mmap needs it)
        return "not in torch's zip format: a plain pickle, a legacy torch.save, or no checkpoint at all"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:200]}" if first and "weights_only" not in first else type(exc).__name__


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with a weights-only `load`; saving and the rest are delegated."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location)


def save_checkpoint(engine, run_dir: Path, step: int, client_state: dict, keep: int) -> None:
    """Collective save (every rank writes its shard); then rank 0 points `latest` at it (atomically: DeepSpeed's
    own `latest` is written in place) and prunes all but the last `keep` tags.

    A save that fails leaves nothing half-written: its tag dir goes, and `latest` names the last complete
    checkpoint (none, if the failed save was overwriting that one). A full disk, a quota, a read-only or forbidden
    dir is one OutputError line naming the checkpoint and what to do.
    """
    ckpt_dir, tag = Path(run_dir) / CKPT_DIR, checkpoint_dir(run_dir, step)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag.name, client_state=client_state, save_latest=False)
    except BaseException as exc:
        err = _unwritable(exc, ckpt_dir, tag)  # before the partial dir goes: that frees the space it took
        if dist.get_rank() == 0:
            _drop_partial(ckpt_dir, tag)
        if err is not None:
            raise err from exc
        raise
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write_text(ckpt_dir / "latest", tag.name)
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _unwritable(exc: BaseException, ckpt_dir: Path, tag: Path) -> OutputError | None:
    """The OutputError a failed save is, if any: an OSError of a full, read-only or forbidden disk, or torch's zip
    writer failing (a RuntimeError from inline_container.cc, no errno: what torch.save raises on ENOSPC) while
    less than 1 MiB is left on the checkpoint's disk."""
    if isinstance(exc, OSError):
        return output_error(exc, tag)
    if isinstance(exc, RuntimeError) and "inline_container" in str(exc):
        with contextlib.suppress(OSError):
            fs = os.statvfs(ckpt_dir)
            if fs.f_bavail * fs.f_frsize < 2**20:
                return output_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tag)
    return None


def _drop_partial(ckpt_dir: Path, tag: Path) -> None:
    """Remove the tag dir a failed save left, and `latest` when it named that dir: no resume from half a save."""
    with contextlib.suppress(OSError):
        if (ckpt_dir / "latest").read_text(errors="replace").strip() == tag.name:
            (ckpt_dir / "latest").unlink()
    shutil.rmtree(tag, ignore_errors=True)


def check_checkpoint(ckpt_dir: Path) -> str:
    """The tag `ckpt_dir/latest` names, after checking that every file of it loads weights-only.

    Raises CheckpointError (one line: which file, why, what to do) for a `latest` that names no
    checkpoint of ours, or for any file the weights-only loader refuses. Loads with mmap: cheap.
    """
    ckpt_dir = Path(ckpt_dir)
    fix = f"delete {ckpt_dir} (or rerun with force=true) to start this cell over"
    try:  # a `latest` that is a dir, a tag dir without read permission: one line too, not a traceback
        tag = (ckpt_dir / "latest").read_text(errors="replace").strip()
        ok = bool(CKPT_TAG.match(tag)) and (ckpt_dir / tag).is_dir()
        # DeepSpeed's files (*.pt) are pickles; other state saved in the tag dir (a rollout's) is safetensors.
        files = sorted(p for p in (ckpt_dir / tag).iterdir() if p.is_file() and p.suffix == ".pt") if ok else []
    except OSError as exc:
        raise CheckpointError(f"{ckpt_dir}: cannot be read ({exc.strerror or exc}): {fix}") from None
    if not ok:
        raise CheckpointError(f"{ckpt_dir / 'latest'} names {tag[:40]!r}, not a checkpoint written here "
                              f"(step<8 digits> with its dir): {fix}")
    if not files:
        raise CheckpointError(f"{ckpt_dir / tag} is empty: {fix}")
    for f in files:
        try:
            safe_load(f, map_location="cpu", mmap=True)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; nothing was loaded: if you did not put it there, someone else did. "
                                  f"Inspect it, then {fix}") from None
    return tag


def load_latest_checkpoint(engine, run_dir: Path) -> dict | None:
    """Resume from `<run_dir>/checkpoints/latest` if present; return its client state (step, ...).

    Rank 0 checks every file of the checkpoint with the weights-only loader first and all ranks follow
    its verdict, so a planted or corrupt file stops every rank with the same one-line CheckpointError
    before anything is loaded. The load itself is weights-only too (WeightsOnlyCheckpointEngine).
    """
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if not (ckpt_dir / "latest").exists():
        return None
    verdict: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            verdict = [("ok", check_checkpoint(ckpt_dir))]
        except CheckpointError as exc:
            verdict = [("error", str(exc))]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    kind, value = verdict[0]
    if kind == "error":
        raise CheckpointError(value)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=value)
    if path is None:
        return None
    log.info("resumed from %s", path)
    return client_state


def export_hf(engine, tokenizer, out_dir: Path, rank: int) -> None:
    """Write the student as a plain Hugging Face model dir (safetensors); gathers ZeRO-3 shards first."""
    import deepspeed

    model = engine.module
    params = list(model.parameters())
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if rank == 0:
            state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
            with atomic_path(out_dir) as tmp:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
    dist.barrier()
