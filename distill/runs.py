"""Run identity and result files: one grid cell <-> one directory <-> one metrics.json.

A cell's identity is a short signature hashed from its resolved config minus the keys that cannot change
its result (logging, launcher, paths, ...), as dora does: the run dir is derived from it, never from the
clock, so a re-submitted or re-run sweep finds its finished cells (skip) and its checkpoints (resume).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"

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
    "trainer.progress",
)

_SECRET_KEY = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)


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
    # `tau=1` and `tau=1.0` are the same cell: numbers that are floats by meaning are hashed as floats.
    if isinstance(data.get("tau"), (int, float)):
        data["tau"] = float(data["tau"])
    if isinstance(data.get("loss", {}).get("kd_ratio"), (int, float)):
        data["loss"]["kd_ratio"] = float(data["loss"]["kd_ratio"])
    # The default rollout reproduces the cells made before rollouts existed: same signature, same dir.
    rollout = data.get("rollout") or {}
    if rollout.get("name", "offline") == "offline":
        data.pop("rollout", None)
    for key in ("lmbda", "init_threshold", "loss_eps"):
        if isinstance(rollout.get(key), int) and not isinstance(rollout.get(key), bool):
            rollout[key] = float(rollout[key])
    for key in ("temperature", "top_p"):
        sampling = rollout.get("sampling") or {}
        if isinstance(sampling.get(key), int) and not isinstance(sampling.get(key), bool):
            sampling[key] = float(sampling[key])
    div = data.get("divergence", {})
    for k, v in div.items():
        if isinstance(v, int) and not isinstance(v, bool):
            div[k] = float(v)
    return data


def signature(cfg: DictConfig | Mapping, length: int = 8) -> str:
    """Short stable hash of `result_config(cfg)` (sorted-key JSON, sha1)."""
    blob = json.dumps(result_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:length]


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


def run_dir(cfg: DictConfig) -> Path:
    """`<sweep_dir>/<cell_name>-<signature>`: the cell's home (checkpoints, metrics, generations)."""
    return Path(cfg.paths.sweep_dir) / f"{cell_name(cfg)}-{signature(cfg)}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same dir + os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write `text` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_metrics(directory: Path) -> dict | None:
    """The cell's metrics.json, or None if absent or unreadable."""
    path = Path(directory) / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_completed(directory: Path) -> bool:
    """True when the cell already has a completed result (it is then skipped unless force=true)."""
    metrics = read_metrics(directory)
    return bool(metrics) and metrics.get("status") == "completed"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def redact(data: Any) -> Any:
    """Drop every mapping key that looks like a secret (api keys, tokens, passwords), recursively.

    Configs are logged to files and W&B; a token that slipped into an override must never follow.
    """
    if isinstance(data, Mapping):
        return {k: redact(v) for k, v in data.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data]
    return data


def flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: flat keys make W&B parallel-coordinates panels usable."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
