"""The job's config: where it lives (`CONF_DIR`), composing it (`compose`), the checks run on it before any
work starts (`check_config`: every problem found, one line each), and what follows from it (the batch plan
and the step schedule).

The allowed values of each option live in distill.options; the divergences' parameters are judged by the
loss core itself (one source of truth).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from distill.options import (CACHE_SETTINGS, DIVERGENCES, EPOCH, LOSS_IMPLS, ON_CHANGE, PRECISIONS, REPLAY_RATIOS,
                             ROLLOUTS, SELECTIONS, TAU_TARGETS, WANDB_MODES, ZERO_STAGES, ConfigError)
from distill.losses.divergences import check_tau, divergence_per_token, per_token, resolve_params
from distill.files import looks_local
from distill.secrets import secret_keys
from distill.tracking.wandb_run import wandb_key_available

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")  # sweep and model names: one path part
# conf/ sits next to the package (editable install): an absolute path works however the app is started.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
    """The config `distill-train` composes from `overrides` (Hydra's compose API), without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def grid_cells(overrides: list[str], grid: list[str]) -> list[list[str]]:
    """The cells of a multirun: the config's `hydra.sweeper.params` with `grid` (`key=a,b`, later wins per key)
    expanded as Hydra's basic sweeper does. [[]] when nothing is swept."""
    cfg = compose(overrides, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()] + list(grid)
    if not params:
        return [[]]
    parsed = OverridesParser.create().parse_overrides(params)
    return BasicSweeper.split_arguments(parsed, None)[0]


def cell_configs(overrides: list[str], cells: list[list[str]]) -> list[DictConfig]:
    """The composed config of every cell (`overrides` + the cell's). Hydra composes once per distinct choice
    of config groups (e.g. divergence=rkl); plain values (tau=2.0, seed=1) are set on a copy, as Hydra would
    override them: a 105-cell grid costs 7 compositions, not 105."""
    def is_group(key: str) -> bool:
        return (CONF_DIR / key.lstrip("+")).is_dir()

    composed: dict[tuple[str, ...], DictConfig] = {}
    out = []
    for cell in cells:
        groups = tuple(o for o in cell if is_group(o.split("=", 1)[0]))
        if groups not in composed:
            composed[groups] = compose([*overrides, *groups])
        cfg = OmegaConf.create(OmegaConf.to_container(composed[groups]))
        with open_dict(cfg):
            for o in cell:
                key, value = o.split("=", 1)
                if not is_group(key):
                    OmegaConf.update(cfg, key.lstrip("+"), yaml.safe_load(value), merge=False)
        out.append(cfg)
    return out


def split_sweep(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(plain overrides, sweep overrides `key=a,b` / `key=range(...)`) of a multirun's command line."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    sweeps = {o.input_line for o in parsed if o.is_sweep_override()}
    return [o for o in overrides if o not in sweeps], [o for o in overrides if o in sweeps]


def plain(cfg: Any) -> dict:
    """A config (DictConfig or mapping) as plain, resolved dicts and lists."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(dict(cfg), default=str))


def problems(cfg: DictConfig, world_size: int | None = None) -> list[str]:
    """Every reason `cfg` cannot run, as readable one-liners (empty when fine)."""
    out: list[str] = []
    tau = cfg.get("tau")
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        out.append(f"tau={tau!r}: the distillation temperature must be a finite number > 0 (e.g. tau=2)")
    t = cfg.trainer
    if t.zero_stage not in ZERO_STAGES:
        out.append(f"trainer.zero_stage={t.zero_stage!r}: must be one of {list(ZERO_STAGES)}")
    if t.precision not in PRECISIONS:
        out.append(f"trainer.precision={t.precision!r}: must be one of {list(PRECISIONS)}")
    elif t.precision == "fp16" and not torch.cuda.is_available():
        out.append("trainer.precision=fp16 does not work with DeepSpeed on CPU: use bf16 or fp32")
    trainer_problems = _trainer_problems(t)
    out.extend(trainer_problems)
    if world_size is not None and not trainer_problems:
        try:
            batch_plan(t, world_size)
        except ConfigError as exc:
            out.append(str(exc))
    out.extend(_loss_problems(cfg))
    out.extend(_model_problems(cfg))
    out.extend(_rollout_problems(cfg))
    out.extend(_optimizer_problems(t))
    out.extend(_eval_problems(cfg))
    out.extend(_reliability_problems(cfg))
    out.extend(_name_problems(cfg))
    out.extend(_logger_problems(cfg))
    return out


def cache_wait_problem(value: Any) -> str | None:
    """What is wrong with a loss.teacher_cache_wait_s value (seconds >= 0, or null: wait for ever), or None."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        return None
    return f"loss.teacher_cache_wait_s={value!r}: must be a number of seconds >= 0, or null (wait for ever)"


def _loss_problems(cfg: DictConfig) -> list[str]:
    """What cannot run in `loss`: the ratio, tau's target, the implementation and the teacher cache."""
    out: list[str] = []
    loss = cfg.loss
    if not 0.0 <= float(loss.kd_ratio) <= 1.0:
        out.append(f"loss.kd_ratio={loss.kd_ratio}: must be in [0, 1] (0 = SFT, 1 = pure distillation)")
    if loss.tau_target not in TAU_TARGETS:
        out.append(f"loss.tau_target={loss.tau_target!r}: must be one of {list(TAU_TARGETS)}")
    if loss.impl not in LOSS_IMPLS:
        out.append(f"loss.impl={loss.impl!r}: must be one of {list(LOSS_IMPLS)}")
    cache, topk = loss.get("teacher_cache", False), loss.get("teacher_cache_topk")
    if cache not in CACHE_SETTINGS:
        out.append(f"loss.teacher_cache={cache!r}: must be one of false, true, auto (the smaller exact form when "
                   "model.teacher.path is set), hidden, logits")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        out.append(f"loss.teacher_cache_topk={topk!r}: must be null (exact) or an integer k >= 1")
    if (wait := cache_wait_problem(loss.get("teacher_cache_wait_s"))) is not None:
        out.append(wait)
    if loss.impl == "fused":
        if float(loss.kd_ratio) != 1.0:
            out.append(f"loss.impl=fused computes only the distillation term: use loss.kd_ratio=1 (got {loss.kd_ratio})")
        if cache == "logits" or (cache and topk is not None):
            out.append("loss.impl=fused reads the teacher's hidden states: use loss.teacher_cache=hidden (or auto), "
                       "not a log-prob cache (logits / teacher_cache_topk)")
    if cache in (True, "hidden", "logits") and float(loss.kd_ratio) > 0 and not cfg.model.teacher.get("path"):
        out.append(f"loss.teacher_cache={str(cache).lower()} needs model.teacher.path (the cache is keyed by the teacher's files); "
                   "auto uses the live teacher when there is no path")
    return out


def _model_problems(cfg: DictConfig) -> list[str]:
    """What cannot run in `model` and `divergence`: the teacher's sharding, the divergence and its parameters,
    the pair's paths."""
    out: list[str] = []
    tau = cfg.get("tau")
    loss = cfg.loss
    shard = cfg.model.teacher.get("shard", False)
    if not isinstance(shard, bool):
        out.append(f"model.teacher.shard={shard!r}: must be true (partition the teacher across ranks, ZeRO-3 "
                   "inference) or false (a full copy per rank)")
    if cfg.divergence.name not in DIVERGENCES:
        out.append(f"divergence={cfg.divergence.name!r}: must be one of {list(DIVERGENCES)}")
    elif isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau):
        out.extend(_divergence_param_problems(cfg))
    m = cfg.model
    for role in ("student", "teacher"):
        path = m[role].get("path")
        if path and looks_local(str(path)) and not Path(str(path)).expanduser().exists():
            out.append(f"model.{role}.path={path}: no such directory (train it first, or point at a HF model dir)")
    if float(loss.kd_ratio) > 0 and not m.teacher.get("path") and not m.teacher.get("allow_random", False):
        out.append(
            "model.teacher.path is not set but loss.kd_ratio > 0: point it at a trained teacher "
            "(train one with experiment=teacher), or use loss.kd_ratio=0 for SFT"
        )
    return out


def _name_problems(cfg: DictConfig) -> list[str]:
    """Names that become directories (the sweep's dir, cell dirs) must stay one plain path part under the root."""
    names = [("sweep_name", cfg.get("sweep_name")), ("model.name", cfg.model.get("name"))]
    names += [(f"model.{role}.name", (cfg.model.get(role) or {}).get("name")) for role in ("student", "teacher")]
    return [f"{key}={value!r}: a name becomes a directory under paths.root: use letters, digits and . _ + - only, "
            "starting with a letter or digit (no '/', '..', spaces or '$')"
            for key, value in names if value is not None and not _plain_name(str(value))]


def _plain_name(name: str) -> bool:
    return bool(SAFE_NAME.match(name)) and ".." not in name


def _logger_problems(cfg: DictConfig) -> list[str]:
    """W&B must never stop at its login prompt (holding the cell's lock): online needs a key up front."""
    logger = cfg.get("logger") or {}
    if logger.get("name") != "wandb":
        return []
    mode = logger.get("mode") or "offline"
    if mode not in WANDB_MODES:
        return [f"logger.mode={mode!r}: must be one of {list(WANDB_MODES)}"]
    if mode == "online" and not wandb_key_available():
        return ["logger.mode=online (WANDB_MODE) needs a W&B API key: set WANDB_API_KEY or run `wandb login`, or "
                "use logger.mode=offline and upload later with `wandb sync`"]
    return []


def _reliability_problems(cfg: DictConfig) -> list[str]:
    """Secrets in the config, and the input-change and cell-lock settings."""
    out = [f"{key}: looks like a secret: pass secrets in the environment (HF_TOKEN, WANDB_API_KEY, ...), never in "
           "a config: configs are written to disk and to W&B"
           for key in secret_keys(OmegaConf.to_container(cfg, resolve=False))]
    on_change = (cfg.get("inputs") or {}).get("on_change", "rerun")
    if on_change not in ON_CHANGE:
        out.append(f"inputs.on_change={on_change!r}: must be one of {list(ON_CHANGE)}")
    lock = cfg.get("cell_lock") or {}
    hb, stale, wait = lock.get("heartbeat_s", 30), lock.get("stale_after_s", 300), lock.get("wait_s")
    if not (isinstance(hb, (int, float)) and isinstance(stale, (int, float)) and 0 < hb < stale):
        out.append(f"cell_lock.heartbeat_s={hb!r}, stale_after_s={stale!r}: need 0 < heartbeat_s < stale_after_s "
                   "(minutes for stale_after_s on a shared filesystem)")
    if wait is not None and (not isinstance(wait, (int, float)) or wait < 0):
        out.append(f"cell_lock.wait_s={wait!r}: must be null (wait while the holder lives) or a number >= 0")
    return out


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _trainer_problems(t: Mapping) -> list[str]:
    """Batch, length and cadence keys of `trainer` (world size apart: see `batch_plan`)."""
    out = []
    for key in ("global_batch_size", "micro_batch_size"):
        if not _positive_int(t.get(key)):
            out.append(f"trainer.{key}={t.get(key)!r}: must be an integer >= 1")
    if t.get("grad_accum") is not None and not _positive_int(t.get("grad_accum")):
        out.append(f"trainer.grad_accum={t.get('grad_accum')!r}: must be null (derived) or an integer >= 1")
    steps, epochs = t.get("max_steps"), t.get("epochs")
    if (steps is None) == (epochs is None):
        out.append(f"trainer.max_steps={steps!r}, trainer.epochs={epochs!r}: set exactly one of them "
                   "(e.g. trainer.epochs=10 trainer.max_steps=null)")
    for key, value in (("max_steps", steps), ("epochs", epochs)):
        if value is not None and not _positive_int(value):
            out.append(f"trainer.{key}={value!r}: must be an integer >= 1 (or null)")
    for key in ("eval_every", "ckpt_every"):
        value = t.get(key, 0)
        if value != EPOCH and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            out.append(f"trainer.{key}={value!r}: must be a number of steps >= 0 (0 = never) or '{EPOCH}'")
    if t.get("select", "last") not in SELECTIONS:
        out.append(f"trainer.select={t.get('select')!r}: must be one of {list(SELECTIONS)}")
    if t.get("val_batches") is not None and not _positive_int(t.get("val_batches")):
        out.append(f"trainer.val_batches={t.get('val_batches')!r}: must be null (the whole valid split) or >= 1")
    return out


def _real(value: Any) -> bool:
    """A finite int or float (not a bool): a numeric setting is compared only once it is one."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(value: Any, low: int, null_ok: bool = False) -> bool:
    return (value is None and null_ok) or (isinstance(value, int) and not isinstance(value, bool) and value >= low)


def _optimizer_problems(t: Mapping) -> list[str]:
    """The optimizer, schedule and logging keys of `trainer`: unchecked, they fail only once training runs (a NaN
    lr in the optimizer, lr=0 in the schedule's min_lr / lr, log_every=0 at the first log line)."""
    out = []
    lr, floor, ratio, betas = t.get("lr"), t.get("min_lr"), t.get("min_lr_ratio", 0.1), t.get("betas", [0.9, 0.999])
    if not (_real(lr) and lr > 0):
        out.append(f"trainer.lr={lr!r}: the peak learning rate must be a finite number > 0 (e.g. 1e-3 for the toy "
                   "models, 5e-5 for GPT-2)")
    elif floor is not None and not (_real(floor) and 0 <= floor <= lr):
        out.append(f"trainer.min_lr={floor!r}: the cosine floor must be null or a number in [0, trainer.lr={lr}]")
    if not (_real(ratio) and 0 <= ratio <= 1):
        out.append(f"trainer.min_lr_ratio={ratio!r}: the cosine floor as a fraction of lr must be in [0, 1]")
    if not (isinstance(betas, Sequence) and len(betas) == 2 and all(_real(b) and 0 <= b < 1 for b in betas)):
        out.append(f"trainer.betas={betas!r}: AdamW's betas must be two numbers in [0, 1) (e.g. [0.9, 0.95])")
    for key, default, what in (("weight_decay", 0.0, "AdamW's decoupled weight decay"),
                               ("grad_clip", 1.0, "the gradient-norm clip; 0 = none")):
        if not (_real(t.get(key, default)) and t.get(key, default) >= 0):
            out.append(f"trainer.{key}={t.get(key)!r}: must be a finite number >= 0 ({what})")
    if not (_real(t.get("dist_timeout_s", 300)) and t.get("dist_timeout_s", 300) > 0):
        out.append(f"trainer.dist_timeout_s={t.get('dist_timeout_s')!r}: the process-group timeout must be a number "
                   "of seconds > 0")
    for key, low, default, what in (("log_every", 1, 10, "steps between train-log lines"),
                                    ("warmup_steps", 0, 0, "steps of linear warmup"),
                                    ("keep_ckpts", 0, 1, "checkpoints kept for the resume; 0 = all")):
        if not _int_at_least(t.get(key, default), low):
            out.append(f"trainer.{key}={t.get(key)!r}: must be an integer >= {low} ({what})")
    for key in ("num_threads", "select_examples"):
        if not _int_at_least(t.get(key), 1, null_ok=True):
            out.append(f"trainer.{key}={t.get(key)!r}: must be null (the default) or an integer >= 1")
    return out


def _eval_problems(cfg: DictConfig) -> list[str]:
    """The generation settings (`eval`) and the data lengths they work within: unchecked, they fail only after
    training, when the exported student generates."""
    e, d, out = cfg.eval, cfg.data, []
    seeds, sample, temp, top_p = e.get("seeds"), e.get("do_sample", True), e.get("temperature", 1), e.get("top_p", 1)
    if not seeds:
        out.append("eval.seeds is empty: give at least one generation seed (the anchors use [10,20,30,40,50])")
    elif isinstance(seeds, str) or not isinstance(seeds, Sequence) or not all(_int_at_least(s, 0) for s in seeds):
        out.append(f"eval.seeds={seeds!r}: must be a list of integer generation seeds >= 0 (e.g. [10,20,30,40,50])")
    if not isinstance(sample, bool):
        out.append(f"eval.do_sample={sample!r}: must be true (sampling) or false (greedy)")
    if not (_real(temp) and (temp > 0 if sample else temp >= 0)):
        out.append(f"eval.temperature={temp!r}: the sampling temperature must be a finite number > 0 with "
                   "eval.do_sample=true (or eval.do_sample=false: greedy); the distillation temperature is tau")
    if not (_real(top_p) and 0 < top_p <= 1):
        out.append(f"eval.top_p={top_p!r}: must be in (0, 1] (1 = no nucleus truncation)")
    for key, low, null_ok, what in (("batch_size", 1, False, "prompts per generate call"),
                                    ("max_examples", 1, True, "examples per benchmark; null = all"),
                                    ("max_new_tokens", 1, True, "null = data.max_length - the prompt's length"),
                                    ("top_k", 0, False, "0 = no top-k"), ("no_repeat_ngram_size", 0, False, "0 = off")):
        if not _int_at_least(e.get(key), low, null_ok):
            out.append(f"eval.{key}={e.get(key)!r}: must be {'null or ' * null_ok}an integer >= {low} ({what})")
    length, prompt = d.get("max_length"), d.get("max_prompt_length")
    if not (_int_at_least(length, 2) and _int_at_least(prompt, 1)):
        out.append(f"data.max_length={length!r}, data.max_prompt_length={prompt!r}: must be integers >= 2 and >= 1")
    elif prompt > length:
        out.append(f"data.max_prompt_length={prompt} > data.max_length={length}: the prompt is part of the sequence: "
                   f"use data.max_prompt_length <= {length} (leaving room for the response, e.g. {length * 5 // 6})")
    return out


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step of `global_batch` examples is run on `world` ranks."""

    global_batch: int   # examples per optimizer step over all ranks: the config's unit, part of the cell's identity
    micro: int          # examples per forward on one rank
    accum: int          # micro-batches per rank per step
    world: int


def batch_plan(trainer: Mapping, world_size: int) -> BatchPlan:
    """Split `trainer.global_batch_size` over `world_size` ranks: micro x accum x world == global.

    With `grad_accum` null (the default) the micro-batch is the largest divisor of the per-rank share
    that is <= `micro_batch_size` (a memory cap), and accumulation makes up the rest; with `grad_accum`
    set, `micro_batch_size` x `grad_accum` x world size must equal the global batch. Raises ConfigError
    with one line saying what to change.
    """
    g, cap, accum = int(trainer["global_batch_size"]), int(trainer["micro_batch_size"]), trainer.get("grad_accum")
    if g % world_size:
        raise ConfigError(f"trainer.global_batch_size={g} is not divisible by the world size ({world_size} ranks): "
                          f"use a multiple of {world_size}, or another number of ranks")
    share = g // world_size
    if accum is not None:
        accum = int(accum)
        if cap * accum != share:
            raise ConfigError(f"trainer.global_batch_size={g} != micro_batch_size ({cap}) x grad_accum ({accum}) x "
                              f"world size ({world_size}) = {cap * accum * world_size}: set grad_accum=null to derive it")
        return BatchPlan(g, cap, accum, world_size)
    micro = max(d for d in range(1, min(cap, share) + 1) if share % d == 0)
    return BatchPlan(g, micro, share // micro, world_size)


@dataclass(frozen=True)
class Schedule:
    """The step counts a cell runs with, once its world size and training-set size are known."""

    batch: BatchPlan
    steps_per_epoch: int   # len(train) // global batch (the last partial batch of an epoch is dropped)
    max_steps: int
    eval_every: int        # steps between evaluations (0 = only the final one)
    ckpt_every: int        # steps between checkpoints (0 = none)

    @property
    def epochs(self) -> float:
        return self.max_steps / self.steps_per_epoch


def schedule(trainer: Mapping, world_size: int, n_train: int) -> Schedule:
    """`trainer` resolved for `world_size` ranks and `n_train` training examples (epochs -> steps)."""
    plan = batch_plan(trainer, world_size)
    per_epoch = n_train // plan.global_batch
    if per_epoch < 1 and trainer.get("epochs") is not None:
        raise ConfigError(f"trainer.epochs={trainer['epochs']}: the training set ({n_train} examples) is smaller than "
                          f"one global batch ({plan.global_batch}): lower trainer.global_batch_size")
    per_epoch = max(per_epoch, 1)
    max_steps = int(trainer["epochs"]) * per_epoch if trainer.get("epochs") is not None else int(trainer["max_steps"])

    def every(key: str) -> int:
        value = trainer.get(key, 0)
        return per_epoch if value == EPOCH else int(value or 0)

    return Schedule(plan, per_epoch, max_steps, every("eval_every"), every("ckpt_every"))


# Where a divergence's parameters, inside the loss core's ranges, still leave nothing to learn: outside these the
# probe below finds the loss exactly 0 (a mixture rounding onto one side, float32 underflow) or not finite.
_USEFUL_PARAMS = {"skl": "alpha well below 1 (e.g. DistiLLM's 0.1: as alpha -> 1 the skewed KL vanishes)",
                  "srkl": "alpha well below 1 (e.g. DistiLLM's 0.1: as alpha -> 1 the skewed KL vanishes)",
                  "ab": "alpha and beta of moderate size (|alpha|, |beta| <= 10 as in ABKD; exactly 0, not a tiny "
                        "number, for a KL limit)"}


def _divergence_param_problems(cfg: DictConfig) -> list[str]:
    """Let the loss core judge the divergence's parameters on a tiny input (one source of truth), then probe the
    loss on two different distributions at the cell's tau: exactly 0 or not finite there, it is so at every step."""
    name, tau, target = cfg.divergence.name, float(cfg.tau), cfg.loss.tau_target
    params = {k: v for k, v in cfg.divergence.items() if k != "name"}
    try:
        divergence_per_token(name, torch.zeros(1, 3), torch.zeros(1, 3), tau=tau, **params)
    except ValueError as exc:
        return [f"divergence={name}: {exc}"]
    if float(cfg.loss.kd_ratio) == 0 or target not in TAU_TARGETS:
        return []  # SFT has no divergence term; a bad tau_target is _loss_problems' to report
    if (verdict := _probe(name, params, tau, target)) is None:
        return []
    if params and _probe(name, {}, tau, target) is None:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        return [f"divergence={name} ({shown}): the loss is {verdict} on two different distributions at tau={tau:g} "
                "(float32 rounding: no training signal, at most noise): use "
                f"{_USEFUL_PARAMS.get(name, 'other values')} (defaults: {resolve_params(name, {})})"]
    why = "the logits / tau overflow" if verdict == "not finite" else "both distributions flatten to uniform"
    return [f"tau={tau:g}: the {name} loss is {verdict} on two different distributions at this temperature ({why} in "
            "float32), so at every step: use a tau of order 1 (0.5 to 10 in the literature)"]


def _probe(name: str, params: dict, tau: float, tau_target: str) -> str | None:
    """'exactly 0' or 'not finite' when divergence `name` with `params` at `tau` is that at every position of two
    different random distributions (a fixed seed: the verdict never changes), else None."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    loss = per_token(name, student, teacher, *check_tau(tau, tau_target), resolve_params(name, params))
    return "not finite" if not bool(torch.isfinite(loss).all()) else "exactly 0" if bool((loss == 0).all()) else None


def _rollout_problems(cfg: DictConfig) -> list[str]:
    """What cannot run in the `rollout` group (absent = offline)."""
    r = cfg.get("rollout") or {"name": "offline"}
    name = r.get("name")
    if name not in ROLLOUTS:
        return [f"rollout={name!r}: must be one of {list(ROLLOUTS)}"]
    out: list[str] = []
    kd = float(cfg.loss.kd_ratio)
    if name in ("on_policy", "sgo") and kd == 0:
        out.append(f"rollout={name} trains on the student's own samples scored by the teacher: it needs "
                   "loss.kd_ratio > 0 (with kd_ratio=0 there is no teacher)")
    if name == "on_policy" and not 0.0 <= float(r.lmbda) <= 1.0:
        out.append(f"rollout.lmbda={r.lmbda}: the probability of a student-sampled micro-batch must be in [0, 1]")
    if name == "sgo":
        if r.replay_ratio not in REPLAY_RATIOS:
            out.append(f"rollout.replay_ratio={r.replay_ratio!r}: must be one of {list(REPLAY_RATIOS)}")
        if not 0.0 <= float(r.init_threshold) <= 1.0:
            out.append(f"rollout.init_threshold={r.init_threshold}: must be in [0, 1]")
        if float(r.loss_eps) < 0:
            out.append(f"rollout.loss_eps={r.loss_eps}: must be >= 0")
        if not isinstance(r.capacity, int) or r.capacity < cfg.trainer.micro_batch_size:
            out.append(f"rollout.capacity={r.capacity!r}: the replay buffer must hold at least one micro-batch "
                       f"(trainer.micro_batch_size={cfg.trainer.micro_batch_size})")
        if float(r.init_threshold) == 0 and not cfg.trainer.eval_every:
            out.append("rollout=sgo with init_threshold=0 adapts its threshold only at validations, and "
                       "trainer.eval_every=0 validates only at the end: set trainer.eval_every (e.g. 25) or "
                       "rollout.init_threshold > 0, else no micro-batch is ever generated")
    if name == "seq_kd":
        if not cfg.model.teacher.get("path"):
            out.append("rollout=seq_kd needs model.teacher.path (its cache of teacher samples is keyed by the teacher's files)")
        if not isinstance(r.batch_size, int) or r.batch_size < 1:
            out.append(f"rollout.batch_size={r.batch_size!r}: must be an integer >= 1")
    s = r.get("sampling")
    if name != "offline" and s is not None:
        if not float(s.temperature) > 0:
            out.append(f"rollout.sampling.temperature={s.temperature}: the sampling temperature must be > 0")
        if not 0.0 < float(s.top_p) <= 1.0:
            out.append(f"rollout.sampling.top_p={s.top_p}: must be in (0, 1]")
        if not isinstance(s.top_k, int) or s.top_k < 0:
            out.append(f"rollout.sampling.top_k={s.top_k!r}: must be an integer >= 0 (0 = no top-k)")
        if s.max_new_tokens is not None and (not isinstance(s.max_new_tokens, int) or s.max_new_tokens < 1):
            out.append(f"rollout.sampling.max_new_tokens={s.max_new_tokens!r}: must be null or an integer >= 1")
    return out


def check_config(cfg: DictConfig, world_size: int | None = None) -> None:
    """Raise ConfigError listing every problem in `cfg` (world size checks only when it is known)."""
    found = problems(cfg, world_size)
    if found:
        raise ConfigError("\n  - " + "\n  - ".join(found) if len(found) > 1 else found[0])
