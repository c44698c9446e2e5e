"""Instruction data: records and their readers (local files in the anchors' formats, the hub).

Formats (all readers return `Record`s: instruction, input, one or more reference outputs):

- ``jsonl``: the MiniLLM/DistiLLM schema, one object per line: ``instruction``, ``input``
  (optional), ``output`` (a string or a list of reference strings). Extra keys (``prompt``,
  ``category``, ...) are ignored. The MiniLLM releases of all five eval sets (``valid.jsonl`` of
  MiniLLM/dolly, self-inst, Vicuna, sinst, uinst) use this schema; every format below accepts it.
- ``dolly``:    databricks-dolly-15k rows: ``instruction``, ``context``, ``response``.
- ``selfinst``: Self-Instruct user-oriented eval rows: ``instruction``, ``instances`` = [{input, output}]
  (one record per instance).
- ``vicuna``:   FastChat question rows: ``text`` (or ``turns``, first turn used) with reference
  answers in ``reference``; the questions alone carry no answer, so use MiniLLM's release.
- ``sinst``:    a Super-NaturalInstructions task file (one JSON object: ``Definition``,
  ``Instances`` = [{input, output: [..]}]) or a directory of them.
- ``uninst``:   Unnatural Instructions core rows: ``instruction``, ``instances`` = [{input, output, ...}].
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any



from distill.options import DATA_FORMATS
log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Record:
    """One instruction example. ``outputs`` holds >= 1 reference (paraphrases of one answer)."""

    instruction: str
    input: str = ""
    outputs: tuple[str, ...] = ()
    task: str = ""  # optional family / category name (embedded suite: the task family)

    def __post_init__(self) -> None:
        if isinstance(self.outputs, str) or not isinstance(self.outputs, tuple):
            raise ValueError(f"Record.outputs must be a tuple of strings, got {type(self.outputs).__name__}")
        if not self.outputs or not all(isinstance(o, str) and o for o in self.outputs):
            raise ValueError(f"Record.outputs needs >= 1 non-empty string, got {self.outputs!r}")

    def target_index(self, seed: int = 0) -> int:
        """Deterministic choice of the training target among the paraphrases.

        A hash of (seed, instruction, input): stable across processes (unlike ``hash()``) and
        uncorrelated with the prompt's surface form, so a model cannot predict which paraphrase
        it will be trained on; the learned answer distribution is a mixture over paraphrases.
        """
        if len(self.outputs) == 1:
            return 0
        h = hashlib.blake2b(f"{seed}\x1f{self.instruction}\x1f{self.input}".encode(), digest_size=8)
        return int.from_bytes(h.digest(), "big") % len(self.outputs)

    def target(self, seed: int = 0) -> str:
        """The training target for ``seed`` (see `target_index`)."""
        return self.outputs[self.target_index(seed)]

    def to_json(self) -> dict[str, Any]:
        """MiniLLM schema with ``output`` as a list (plus ``task`` when set)."""
        d: dict[str, Any] = {"instruction": self.instruction, "input": self.input, "output": list(self.outputs)}
        if self.task:
            d["task"] = self.task
        return d


# ----------------------------------------------------------------------------------------------
# readers


class _RowError(ValueError):
    """A problem with one row; the reader adds file and line."""


def _str_field(row: Mapping, key: str, fmt: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise _RowError(f"missing field {key!r} (format {fmt!r} has keys: {_expected(fmt)}; got {sorted(row)})")
        return ""
    v = row[key]
    if not isinstance(v, str):
        raise _RowError(f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def _refs(v: Any, key: str) -> list[str]:
    """References as a list of strings (empty ones kept here; the caller skips and counts them)."""
    refs = [v] if isinstance(v, str) else v
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise _RowError(f"field {key!r} must be a string or a list of strings, got {type(v).__name__}")
    return refs


def _expected(fmt: str) -> str:
    return {
        "jsonl": "instruction, input (optional), output (str or list)",
        "dolly": "instruction, context, response (or the MiniLLM jsonl schema)",
        "selfinst": "instruction, instances=[{input, output}] (or the MiniLLM jsonl schema)",
        "vicuna": "text or turns, reference (or the MiniLLM jsonl schema)",
        "sinst": "Definition, Instances=[{input, output}] (or the MiniLLM jsonl schema)",
        "uninst": "instruction, instances=[{input, output}] (or the MiniLLM jsonl schema)",
    }[fmt]


def _task(row: Mapping) -> str:
    """Optional family/category label (embedded ``task``, Dolly ``category``)."""
    t = row.get("task", row.get("category", ""))
    return t if isinstance(t, str) else ""


Parsed = list[tuple[str, str, list[str], str]]  # [(instruction, input, references, task)]


def _parse_minillm(row: Mapping, fmt: str) -> Parsed:
    if "output" not in row:
        raise _RowError(f"missing field 'output' (format {fmt!r} has keys: {_expected(fmt)}; got {sorted(row)})")
    instruction, inp = _str_field(row, "instruction", fmt), _str_field(row, "input", fmt, required=False)
    return [(instruction, inp, _refs(row["output"], "output"), _task(row))]


def _parse_dolly(row: Mapping) -> Parsed:
    instruction, context = _str_field(row, "instruction", "dolly"), _str_field(row, "context", "dolly", required=False)
    return [(instruction, context, _refs(row["response"], "response"), _task(row))]


def _instances(row: Mapping, key: str) -> list[Mapping]:
    inst = row[key]
    if not isinstance(inst, list) or not all(isinstance(i, Mapping) and "output" in i for i in inst):
        raise _RowError(f"field {key!r} must be a list of objects with an 'output'")
    return inst


def _parse_instances(row: Mapping, fmt: str) -> Parsed:
    """Self-Instruct / Unnatural Instructions: one instruction, several (input, output) instances."""
    instruction = _str_field(row, "instruction", fmt)
    out = []
    for inst in _instances(row, "instances"):
        if "{INPUT}" in instruction and "instruction_with_input" in inst:
            # UnNI placeholder instructions would leak "{INPUT}" into the prompt: use the filled-in one
            out.append((_str_field(inst, "instruction_with_input", fmt), "", _refs(inst["output"], "output"), ""))
        else:
            inp = _str_field(inst, "input", fmt, required=False)
            out.append((instruction, inp, _refs(inst["output"], "output"), ""))
    return out


def _parse_sinst_task(row: Mapping) -> Parsed:
    """A Super-NaturalInstructions task file: the Definition is the instruction of every instance."""
    definition = row.get("Definition")
    definition = definition[0] if isinstance(definition, list) and definition else definition
    if not isinstance(definition, str):
        raise _RowError("field 'Definition' must be a string or a list of strings")
    return [(definition, _str_field(inst, "input", "sinst", required=False), _refs(inst["output"], "output"), "")
            for inst in _instances(row, "Instances")]


def _parse_fastchat(row: Mapping) -> Parsed:
    """A FastChat/Vicuna question (``text``, or the first of ``turns``) with its ``reference`` answer."""
    turns = row.get("turns")
    q = row["text"] if "text" in row else (turns[0] if isinstance(turns, list) and turns else None)
    if not isinstance(q, str):
        raise _RowError("field 'text' (or the first of 'turns') must be a string")
    if not row.get("reference"):
        raise _RowError("vicuna question has no 'reference' answer "
                        "(the FastChat questions carry none: use MiniLLM/Vicuna valid.jsonl)")
    return [(q, "", _refs(row["reference"], "reference"), _task(row))]


def parse_row(row: Mapping, fmt: str) -> Parsed:
    """One source row -> [(instruction, input, references, task)] for ``fmt`` (see module docstring).

    Each format reads its upstream schema and falls back to the MiniLLM schema, which is what
    MiniLLM's releases of all five eval sets use.
    """
    if not isinstance(row, Mapping):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "dolly" and "response" in row:
        return _parse_dolly(row)
    if fmt in ("selfinst", "uninst") and "instances" in row:
        return _parse_instances(row, fmt)
    if fmt == "sinst" and "Instances" in row:
        return _parse_sinst_task(row)
    if fmt == "vicuna" and "output" not in row and ("text" in row or "turns" in row):
        return _parse_fastchat(row)
    return _parse_minillm(row, fmt)


def _records_from_rows(rows: Iterable[tuple[str, Mapping]], fmt: str, counts: Counter) -> list[Record]:
    """rows = (location, row) pairs; empty references are skipped and counted."""
    records = []
    for where, row in rows:
        try:
            parsed = parse_row(row, fmt)
        except _RowError as e:
            raise ValueError(f"{where}: {e}") from None
        for instruction, inp, refs, task in parsed:
            if not instruction.strip():
                raise ValueError(f"{where}: empty 'instruction'")
            kept = tuple(r for r in refs if r.strip())
            counts["empty_references"] += len(refs) - len(kept)
            if not kept:
                counts["records_without_reference"] += 1
                continue
            records.append(Record(instruction, inp, kept, task))
    return records


def _decode(raw: bytes, where: str) -> str:
    """UTF-8 text of `raw`, or a ValueError naming the place and the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
                         "re-encode the file as UTF-8") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:  # bytes, so that a bad byte is reported with its line
        for i, raw in enumerate(f, start=1):
            line = _decode(raw, f"{path}:{i}")
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None


def _json_rows(path: Path) -> list[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        _decode(raw.splitlines()[line - 1], f"{path}:{line}")
        raise  # pragma: no cover (the line itself fails to decode)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(obj, list):
        return [(f"{path}[{i}]", row) for i, row in enumerate(obj)]
    return [(str(path), obj)]


def _source_files(path: Path, fmt: str) -> list[Path]:
    """A file, or a directory: MiniLLM layout (``valid.jsonl``) or S-NI task files (``*.json``)."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if (path / "valid.jsonl").is_file():
        return [path / "valid.jsonl"]
    tasks = sorted(path.glob("task*.json")) if fmt == "sinst" else []
    if tasks:
        return tasks
    wanted = "valid.jsonl or task*.json files" if fmt == "sinst" else "valid.jsonl"
    raise FileNotFoundError(f"{path} is a directory without {wanted}")


def read_records_with_stats(path: str | Path, fmt: str = "jsonl") -> tuple[list[Record], Counter]:
    """Like `read_records`, also returning counts of skipped empty references / records."""
    if fmt not in DATA_FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; allowed: {', '.join(DATA_FORMATS)}")
    path = Path(path)
    counts: Counter = Counter()
    records: list[Record] = []
    for f in _source_files(path, fmt):
        rows = _json_rows(f) if f.suffix == ".json" else _jsonl_rows(f)
        records += _records_from_rows(rows, fmt, counts)
    skipped = counts["records_without_reference"]
    if not records:
        raise ValueError(f"{path}: no usable records (format {fmt!r}; skipped {skipped} without a reference)")
    if counts["empty_references"]:
        log.warning("%s: skipped %d empty references, %d records without any",
                    path, counts["empty_references"], skipped)
    return records, counts


def read_records(path: str | Path, fmt: str = "jsonl") -> list[Record]:
    """Read a local file (or MiniLLM-style dir) of instruction data in format ``fmt``.

    ``fmt`` is one of jsonl | dolly | selfinst | vicuna | sinst | uninst (module docstring).
    Malformed rows raise ValueError naming file, line and the problem; empty references are
    skipped and counted (logged; see `read_records_with_stats`); no usable record is an error.
    """
    return read_records_with_stats(path, fmt)[0]


def load_hub_records(hub_id: str, split: str = "train", fmt: str = "dolly", cache_dir: str | Path | None = None,
                     **load_kwargs: Any) -> list[Record]:
    """Load a dataset with `datasets.load_dataset` (a Hub id, or a local dir / data_files) as Records.

    Works offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1) when the dataset is in the HF cache or
    ``hub_id`` is a local path.
    """
    import datasets

    if fmt not in DATA_FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; allowed: {', '.join(DATA_FORMATS)}")
    cache_dir = None if cache_dir is None else str(cache_dir)
    ds = datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir, **load_kwargs)
    counts: Counter = Counter()
    records = _records_from_rows(((f"{hub_id}[{split}] row {i}", row) for i, row in enumerate(ds)), fmt, counts)
    if not records:
        raise ValueError(f"{hub_id}[{split}]: no usable records (format {fmt!r})")
    if counts["empty_references"]:
        log.warning("%s[%s]: skipped %d empty references, %d records without any", hub_id, split,
                    counts["empty_references"], counts["records_without_reference"])
    return records
