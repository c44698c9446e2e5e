"""Results follow content: fingerprints of every input file a cell's result depends on.

A cell's identity (distill.cell.identity.signature) hashes its config; a config names files by path, and a path
says nothing about what the file holds today. So every input file (data files, the embedded suite, the
teacher's and the student's weights, the tokenizer) is fingerprinted by content, the sha256 of its bytes,
and the digests join the identity: edit a data file or retrain a teacher into the same dir, and the cell
is a new cell. Each fingerprint is recorded in metrics.json (`inputs`: path, size, mtime, sha256).

Hashing a 15 GB teacher for every cell would not be cheap, so digests are memoised per file under
`<paths.cache_dir>/fingerprints.json` (distill.cell.hashing.DigestCache): an unchanged file is read once.
A hub id (`gpt2`) is fingerprinted through its local HF cache snapshot, if any.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from distill.cell.hashing import DigestCache, files_digest
from distill.cell.identity import run_dir
from distill.config import plain
from distill.data.embedded import prepare_embedded
from distill.files import looks_local
from distill.options import InputError

log = logging.getLogger(__name__)

def fingerprint_path(path: str | os.PathLike, cache: DigestCache) -> dict[str, Any]:
    """{path, files, size, mtime, sha256} of a file, or of a dir (every regular file below it, hidden ones aside)."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    else:
        raise InputError(f"{p}: no such file or directory")
    digest = cache.sha256(p) if p.is_file() else files_digest(files, p, cache)
    stats = [f.stat() for f in files]
    mtime = max((s.st_mtime for s in stats), default=0.0)
    return {"path": str(p.resolve()), "files": len(files), "size": sum(s.st_size for s in stats),
            "mtime": _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(timespec="seconds"),
            "sha256": digest}


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local HF cache snapshot of a hub id, if it is there (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, not a valid id, no huggingface_hub: nothing to fingerprint locally
        return None


def fingerprint_ref(ref: str, cache: DigestCache) -> dict[str, Any]:
    """Fingerprint a local path, or a hub id through its cached snapshot (sha256 None when not cached)."""
    if looks_local(ref):
        return fingerprint_path(ref, cache)
    snap = _hub_snapshot(ref)
    if snap is None:
        return {"hub_id": ref, "sha256": None}
    return {"hub_id": ref, **fingerprint_path(snap, cache)}


def input_refs(cfg: Any) -> dict[str, str]:
    """role -> path (or hub id) of every input the cell's result depends on, except the embedded suite."""
    c = plain(cfg)
    data, model, loss = c.get("data", {}), c.get("model", {}), c.get("loss", {})
    refs: dict[str, str] = {}
    if data.get("kind") == "jsonl":
        for key in ("train_file", "valid_file"):
            if data.get(key):
                refs[f"data.{key}"] = str(data[key])
        for name in data.get("benchmarks") or []:
            path = (data.get("benchmark_files") or {}).get(name)
            if path:
                refs[f"data.benchmark_files.{name}"] = str(path)
    if float(loss.get("kd_ratio", 1.0)) > 0 and model.get("teacher", {}).get("path"):
        refs["model.teacher"] = str(model["teacher"]["path"])
    if model.get("student", {}).get("path"):
        refs["model.student"] = str(model["student"]["path"])
    if model.get("tokenizer"):
        refs["model.tokenizer"] = str(model["tokenizer"])
    return refs


def fingerprints(cfg: Any, embedded_dir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """role -> fingerprint of every input of `cfg` (+ the embedded suite's dir when given), cached by stat."""
    c = plain(cfg)
    cache = DigestCache(c.get("paths", {}).get("cache_dir"))
    out: dict[str, dict[str, Any]] = {}
    if embedded_dir is not None:
        out["data.embedded"] = fingerprint_path(embedded_dir, cache)
    for role, ref in input_refs(c).items():
        try:
            out[role] = fingerprint_ref(ref, cache)
        except InputError as exc:
            raise InputError(f"{role}={ref}: {str(exc).split(': ', 1)[-1]}: point it at an existing path") from None
        except OSError as exc:
            raise InputError(f"{role}={ref}: cannot be read ({exc.strerror or exc}): check its permissions") from None
    cache.save()
    return out


def digests(fps: Mapping[str, Mapping[str, Any]]) -> dict[str, str | None]:
    """The part of the fingerprints that is identity: role -> sha256."""
    return {role: fp.get("sha256") for role, fp in sorted(fps.items())}


def changes(old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What differs between two fingerprint sets, one readable item per input."""
    out = []
    for role in sorted(set(old) | set(new)):
        a, b = old.get(role) or {}, new.get(role) or {}
        if a.get("sha256") != b.get("sha256"):
            def show(fp):
                return "absent" if not fp else f"sha256 {str(fp.get('sha256'))[:12]} ({fp.get('size')} bytes, modified {fp.get('mtime')})"
            out.append(f"{role}: {show(a)} -> {show(b)}")
    return out


def embedded_dir(cfg: Any) -> Path | None:
    """The embedded suite's dir (generated once, under a lock) when `cfg` uses it: its files are the cell's
    data and tokenizer, so they are fingerprinted like any data file."""
    c = plain(cfg)
    if c.get("data", {}).get("kind") != "embedded":
        return None
    data_dir = c.get("paths", {}).get("data_dir")
    try:
        return prepare_embedded(c["data"], Path(data_dir))
    except OSError as exc:
        raise InputError(f"paths.data_dir={data_dir}: cannot write the embedded suite there "
                         f"({exc.strerror or exc}): point paths.root (or DISTILL_OUTPUT) at a writable dir") from exc


def locate(cfg: Any) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The run dir `distill-train` gives `cfg`, and the input fingerprints it is named by."""
    fps = fingerprints(cfg, embedded_dir(cfg))
    return run_dir(cfg, inputs=fps), fps
