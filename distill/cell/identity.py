"""Run identity and result files: one grid cell <-> one directory <-> one metrics.json.

A cell's identity is a short signature hashed from its resolved config minus the keys that cannot change
its result (logging, launcher, paths, ...), as dora does: the run dir is derived from it, never from the
clock, so a re-submitted or re-run sweep finds its finished cells (skip) and its checkpoints (resume).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from distill.cell.hashing import short_hash

log = logging.getLogger(__name__)

# Top-level keys (or dotted paths) that do not change what a cell computes.
NON_RESULT_KEYS = (
    "hydra",
    "logger",
    "paths",
    "force",
    "sweep_name",
    "sweep",
    "eval.write_generations",
    "trainer.log_every",
    # how a global batch is split over ranks and micro-batches changes no result (exact accumulation):
    # the global batch (trainer.global_batch_size) is the identity, the same on 1 or 8 GPUs
    "trainer.micro_batch_size",
    "trainer.grad_accum",
    "trainer.gradient_checkpointing",
    "model.teacher.name",   # labels (cell names, W&B); the paths are the identity
    "model.student.name",
    "trainer.ckpt_every",
    "trainer.keep_ckpts",
    "trainer.dist_timeout_s",
    "loss.teacher_cache_wait_s",  # how long to wait for another cell's teacher-cache build: no result
    "trainer.progress",
    "cell_lock",
    "inputs.on_change",
)



def _drop(container: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in container:
        return
    if rest:
        if isinstance(container[head], dict):
            _drop(container[head], rest)
    else:
        del container[head]


def result_config(cfg: DictConfig | Mapping) -> dict:
    """The resolved config restricted to what determines a cell's result."""
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True)
    else:
        data = json.loads(json.dumps(cfg))
    assert isinstance(data, dict)
    for key in NON_RESULT_KEYS:
        _drop(data, key)
    # The default rollout reproduces the cells made before rollouts existed: same signature, same dir.
    if (data.get("rollout") or {}).get("name", "offline") == "offline":
        data.pop("rollout", None)
    return float_fields(data)


def float_fields(data: dict) -> dict:
    """Numbers that are floats by meaning (tau, loss.kd_ratio, divergence params) as floats, in place.

    `tau=1` and `tau=1.0` are the same cell: they hash alike and show alike in W&B.
    """
    if isinstance(data.get("tau"), (int, float)):
        data["tau"] = float(data["tau"])
    loss = data.get("loss")
    if isinstance(loss, dict) and isinstance(loss.get("kd_ratio"), (int, float)):
        loss["kd_ratio"] = float(loss["kd_ratio"])
    rollout = data.get("rollout") if isinstance(data.get("rollout"), dict) else {}
    for key in ("lmbda", "init_threshold", "loss_eps"):
        if isinstance(rollout.get(key), int) and not isinstance(rollout.get(key), bool):
            rollout[key] = float(rollout[key])
    sampling = rollout.get("sampling") if isinstance(rollout.get("sampling"), dict) else {}
    for key in ("temperature", "top_p"):
        if isinstance(sampling.get(key), int) and not isinstance(sampling.get(key), bool):
            sampling[key] = float(sampling[key])
    div = data.get("divergence")
    for k, v in (div.items() if isinstance(div, dict) else ()):
        if isinstance(v, int) and not isinstance(v, bool):
            div[k] = float(v)
    return data


def signature(cfg: DictConfig | Mapping, length: int = 8, inputs: Mapping[str, Any] | None = None) -> str:
    """Short stable hash of `result_config(cfg)` (sorted-key JSON, sha1), and of the inputs' content.

    `inputs` (distill.cell.fingerprints.fingerprints) joins the identity by content digest only: the same file
    moved keeps its identity through the config's path; the same path with new bytes is a new cell.
    Without `inputs` this is the config's signature alone.
    """
    data = result_config(cfg)
    if inputs:
        data = {"config": data, "inputs": {k: (v.get("sha256") if isinstance(v, Mapping) else v)
                                           for k, v in sorted(inputs.items())}}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return short_hash(blob, length)


def _or_none(convert, value):
    return None if value is None else convert(value)


def rollout_label(rollout_cfg: Mapping[str, Any] | None) -> str:
    """A short human label of a rollout config: 'offline', 'on_policy λ=0.5', 'sgo decreasing', 'seq_kd'.

    Sampling settings other than the defaults (T=1, top_p=1, top_k=0) are appended, so two cells whose
    sequences come from different places never share a label (report rows, W&B tags).
    """
    r = dict(rollout_cfg or {"name": "offline"})
    name = r.get("name", "offline")
    if name == "on_policy":
        text = f"on_policy λ={float(r['lmbda']):g}"
    elif name == "sgo":
        text = f"sgo {r['replay_ratio']}" + (f" θ0={float(r['init_threshold']):g}" if float(r["init_threshold"]) else "")
    else:
        text = str(name)
    s = r.get("sampling") or {}
    extra = [f"{k}={s[k]:g}" for k, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0))
             if k in s and float(s[k]) != default]
    return " ".join([text, *extra])


def cell_identity(cfg: DictConfig | Mapping, sig: str | None) -> dict[str, Any]:
    """The 'cell' block of metrics.json: what a report groups and compares on.

    From the job's config, or from a W&B run's config (nested again after W&B's flat keys): the report reads
    cells from either source through this one function. A key the config lacks gives None.
    """
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    div, loss = dict(c.get("divergence") or {}), c.get("loss") or {}
    model, kd_ratio = c.get("model") or {}, loss.get("kd_ratio", 1.0)
    name = div.pop("name", None)
    return {
        "divergence": name if kd_ratio > 0 else "sft",
        "divergence_params": div,
        "tau": _or_none(float, c.get("tau")),
        "tau_target": loss.get("tau_target"),
        "tau_squared": _or_none(bool, loss.get("tau_squared")),
        "kd_ratio": float(kd_ratio),
        "seed": _or_none(int, c.get("seed")),
        # the training budget (ablations compare budgets): steps, or epochs (recipes)
        "max_steps": _or_none(int, (c.get("trainer") or {}).get("max_steps")),
        "epochs": _or_none(int, (c.get("trainer") or {}).get("epochs")),
        "model": model.get("name"),
        "teacher": (model.get("teacher") or {}).get("path") if kd_ratio > 0 else None,
        "student": (model.get("student") or {}).get("path") or f"{model.get('arch', 'hf')}-init",
        "dataset": (c.get("data") or {}).get("name"),
        "rollout": rollout_label(c.get("rollout")),
        "signature": sig,
    }


def _fmt_number(x: float) -> str:
    return f"{float(x):g}".replace("-", "m")


def _rollout_tag(cfg: DictConfig) -> str | None:
    """`onpolicy0.5`, `sgo`, `seqkd`; None for the default offline rollout (names stay as they were)."""
    r = cfg.get("rollout") or {}
    name = r.get("name", "offline")
    if name == "on_policy":
        return f"onpolicy{_fmt_number(r.lmbda)}"
    if name == "offline":
        return None
    return str(name).replace("_", "")


def model_label(cfg: DictConfig, role: str = "student") -> str:
    """Short name of the `role` model: `model.<role>.name`, else the last part of its path, else its arch."""
    spec = cfg.model[role]
    if spec.get("name"):
        return str(spec.name)
    if spec.get("path"):
        path = Path(str(spec.path))
        return path.parent.name if path.name == "student" else path.name  # a previous cell's export
    return str(cfg.model.get("arch") or cfg.model.get("name") or "model")


def cell_name(cfg: DictConfig) -> str:
    """Readable prefix of a cell dir, naming the trained model: `sft-gpt2-xl-s0` (kd_ratio=0),
    `fkl-tau2-gpt2-s0`, `fkl-tau2-kd0.5-gpt2-s0`, and with a rollout other than offline
    `jsd-tau1-onpolicy0.5-gpt2-s0`, `skl-tau1-sgo-gpt2-s0`, `sft-seqkd-gpt2-s0`."""
    seed, model = f"s{cfg.seed}", model_label(cfg, "student")
    kd = float(cfg.loss.kd_ratio)
    rollout = _rollout_tag(cfg)
    if kd == 0.0:
        return "-".join(["sft", *([rollout] if rollout else []), model, seed])
    parts = [str(cfg.divergence.name), f"tau{_fmt_number(cfg.tau)}"]
    if kd != 1.0:
        parts.append(f"kd{_fmt_number(kd)}")
    if rollout:
        parts.append(rollout)
    parts += [model, seed]
    return "-".join(parts)


def run_dir(cfg: DictConfig, inputs: Mapping[str, Any] | None = None) -> Path:
    """`<sweep_dir>/<cell_name>-<signature>`: the cell's home (checkpoints, metrics, generations)."""
    return Path(cfg.paths.sweep_dir) / f"{cell_name(cfg)}-{signature(cfg, inputs=inputs)}"


