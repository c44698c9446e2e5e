"""Read W&B's offline run files (`run-<id>.wandb`) back: what an attempt of a cell really put on disk.

A `.wandb` file is W&B's transaction log: LevelDB's log format (a 7-byte header, then 32 KiB blocks
of chunks `crc32 | length | type | data`, records split into FIRST/MIDDLE/LAST chunks across block
boundaries) holding `wandb_internal_pb2.Record` protobufs. `wandb sync` uploads these records.
wandb >= 0.30 writes and reads them in its Go core only (the Python `DataStore` is gone), so this
module reads them with the protobuf classes wandb still ships.

Why the tracker needs it: the Go writer puts a block on disk only when its 32 KiB are full (measured
with wandb 0.31: 20 logged steps, then SIGKILL -> a 7-byte file). A hard-killed attempt therefore
leaves a file that ends at a block boundary, often in the middle of a record, and loses every step
of its last block. The next attempt reads what did land (`logged_steps`), cuts the torn record off
(`repair`, or `wandb sync` stops at it and never syncs the later attempts of that run), and logs only
what is missing.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

BLOCK = 32768
HEADER = 7                      # chunk header: crc32 (4) + length (2) + type (1); file header is 7 bytes too
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
FILE_MAGIC = b":W&B"
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (FULL, FIRST, MIDDLE, LAST)}


def _scan(data: bytes) -> Iterator[tuple[bytes, int]]:
    """(record bytes, offset just after it) for every complete record; stops at a torn or corrupt tail."""
    if data[:4] != FILE_MAGIC:
        raise ValueError("not a W&B transaction log (no ':W&B' header)")
    pos, parts = HEADER, []
    while True:
        if BLOCK - pos % BLOCK < HEADER:          # too little room for a chunk header: zero padding
            pos += BLOCK - pos % BLOCK
        if pos + HEADER > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + HEADER:pos + HEADER + length]
        if kind not in _TYPE_CRC or len(chunk) < length or zlib.crc32(chunk, _TYPE_CRC[kind]) != crc:
            return                                 # zeros (end of a short block), torn write or garbage
        pos += HEADER + length
        if kind in (FULL, FIRST):
            parts = [chunk]
        else:
            parts.append(chunk)
        if kind in (FULL, LAST):
            yield b"".join(parts), pos
            parts = []


def read_records(path: str | os.PathLike) -> Iterator:
    """The `wandb_internal_pb2.Record`s of one `.wandb` file, in order; a torn tail is skipped."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw, _ in _scan(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        yield record


def _put(out: dict, item) -> None:
    """Set an item's JSON value under its key; a nested key (a table's fields) becomes nested dicts."""
    keys = [item.key] if item.key else list(item.nested_key)
    for k in keys[:-1]:
        out = out.setdefault(k, {})
    out[keys[-1]] = json.loads(item.value_json)


def history_rows(path: str | os.PathLike) -> list[dict]:
    """Every history row of the file as {key: value} (values JSON-decoded), `_step` included."""
    rows = []
    for r in read_records(path):
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in r.history.item:
                _put(row, item)
            rows.append(row)
    return rows


def run_info(path: str | os.PathLike) -> tuple[dict, dict]:
    """(run record fields, config) of the file: id, group, job_type, name; config as logged (JSON-decoded)."""
    for r in read_records(path):
        if r.WhichOneof("record_type") == "run":
            run = r.run
            config = {i.key: json.loads(i.value_json) for i in run.config.update}
            return ({"run_id": run.run_id, "group": run.run_group, "job_type": run.job_type,
                     "display_name": run.display_name, "project": run.project}, config)
    raise ValueError(f"{path}: no run record")


def final_summary(path: str | os.PathLike) -> dict:
    """The run's summary as the file leaves it: every summary update applied in order."""
    out: dict = {}
    for r in read_records(path):
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                _put(out, item)
            for item in r.summary.remove:
                out.pop(item.key or item.nested_key[0], None)
    return out


def logged_steps(paths: list[str | os.PathLike]) -> dict[str, int]:
    """For each metric key, the last step at which any of these files holds it (W&B's `_*` keys excluded)."""
    last: dict[str, int] = {}
    for path in paths:
        for row in history_rows(path):
            step = int(row.get("_step", -1))
            for key in row:
                if not key.startswith("_"):
                    last[key] = max(last.get(key, -1), step)
    return last


def repair(path: str | os.PathLike) -> int:
    """Cut a torn record off the end of a dead attempt's file, so that `wandb sync` reads it to the end.

    Returns the number of bytes removed (0 if the file ends cleanly). Never call it on the file of a
    run that is still writing.
    """
    data = Path(path).read_bytes()
    end = HEADER
    for _, end in _scan(data):
        pass
    tail = data[end:]
    if not tail.strip(b"\x00"):               # nothing, or the zero padding of a block
        return 0
    with open(path, "r+b") as f:
        f.truncate(end)
    return len(data) - end


def run_files(wandb_dir: str | os.PathLike, run_id: str) -> list[Path]:
    """The `.wandb` files of every attempt of `run_id` under `<wandb_dir>/wandb/`, oldest first."""
    pattern = os.path.join(glob.escape(str(wandb_dir)), "wandb", f"*run-*-{glob.escape(run_id)}",
                           f"run-{glob.escape(run_id)}.wandb")
    return sorted(Path(p) for p in glob.glob(pattern))   # dir names start with the start time
