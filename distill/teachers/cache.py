"""The frozen teacher, paid once per grid: its outputs at every response position, cached on disk.

Every cell of a tau x divergence grid runs the same teacher over the same teacher-forced sequences, so the
teacher's outputs are computed once per (teacher weights, encoded training set, dtype, form) and reused by every
cell that shares them. The cache is built under a lock (cells that start together wait for the first), by every
rank of that cell at once (each writes its share of the shards), published by an index written last and
atomically, and named by the signature of its inputs: a stale cache cannot match.

Three forms (`loss.teacher_cache`):

- ``hidden``: the teacher's final hidden states (after its final norm) in the teacher's dtype, H values per
  position. Exact: the logits are one matmul away, and at train time the teacher's own output head (weight,
  bias, logit scaling / softcapping: `distill.models.OutputHead`) makes them, chunk by chunk inside the fused
  loss. H/V of the logits' size at the same dtype (1600/50257 at GPT-2 XL, 3584/152064 at Qwen2.5-7B).
- ``logits``: float32 tau=1 log-probs over the whole vocabulary, V values per position. Exact; smaller than
  ``hidden`` only for a vocabulary below H x itemsize / 4 (never for a real LM; the embedded demo's 512-token
  vocabulary with a 128-dim teacher included).
- ``topk``: the k largest log-probs and their ids, plus the tail mass, spread uniformly over the other V - k
  tokens when the rows are rebuilt. **Approximate**: the top-k part is exact, the tail keeps its total mass but
  loses its shape, which is the non-dominant signal a higher tau amplifies (`benchmarks/bench_teacher_cache.py`
  measures the error: 7-33% of the loss at tau >= 2 even with k = V/4).

``true`` / ``auto`` pick the smaller exact form (`resolve_kind`): ``hidden`` whenever H x itemsize < V x 4.
Log-probs recover any tau exactly, since softmax(log_softmax(z) / tau) = softmax(z / tau).

On disk: ``<cache_dir>/teacher-<key>/index.json`` (written last) and ``shard-<start>-<stop>.safetensors`` files,
each holding a contiguous range of examples (``offsets`` plus ``values`` [positions, H or V], and for top-k
``topk_ids`` and ``tail_mass``). Shards are opened memory-mapped (`safetensors.safe_open`): a batch reads only
its own rows, nothing is unpickled, and no process holds the whole cache in memory.

A cache cannot be silently wrong or stuck (`distill.teachers.shards`, `distill.teachers.build_lock`):

- the index records each shard's sha256 and size, taken when the shard was written; a cell verifies every shard
  before it trusts the cache (each file is read once per process);
- a complete cache whose shards verify is read without the lock (a read-only cache dir works);
- a missing, truncated or altered shard is rebuilt under the lock, with a warning naming it (only the bad
  shards); when the cache dir is not writable the cell refuses with one line (`InputError`);
- a cell waiting for another cell's build says what it waits for and who holds the lock, again every few
  minutes, and gives up (`InputError`) after `loss.teacher_cache_wait_s` seconds without progress by the holder.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distill.cell.hashing import DigestCache, files_digest, short_hash, token_digest
from distill.data.encoding import collate_train, response_mask
from distill.files import atomic_path, atomic_write_json
from distill.models import final_hidden, output_head, param_shape
from distill.options import CACHE_KINDS, CACHE_SETTINGS, InputError
from distill.teachers.build_lock import BuildLock
from distill.teachers.shards import SHARD_EXAMPLES, index_entry, plan_build, shard_name, shard_plan, write_checked

log = logging.getLogger(__name__)

# 3: shards carry checksums (caches of format 2 have other keys: they are not found, and are built once again)
FORMAT_VERSION = "3"
WAIT_TIMEOUT = _dt.timedelta(days=1)  # how long a cell's ranks wait for their rank 0's word (it may be waiting)
WAIT_S = 3600.0  # loss.teacher_cache_wait_s: a cell gives up on a cache builder without progress for this long
WAIT_SETTING = "loss.teacher_cache_wait_s"


# --------------------------------------------------------------------------------------------- sizes and forms
def bytes_per_position(kind: str, *, hidden_size: int, vocab_size: int, dtype: torch.dtype,
                       topk: int | None = None) -> int:
    """Bytes one response position takes in the cache of form `kind`."""
    if kind == "hidden":
        return hidden_size * torch.empty((), dtype=dtype).element_size()
    if kind == "logits":
        return vocab_size * 4  # float32 log-probs
    if kind == "topk":
        if not topk:
            raise ValueError("the top-k form needs teacher_cache_topk = k")
        return topk * (4 + 4) + 4  # float32 log-probs + int32 ids + float32 tail mass
    raise ValueError(f"unknown teacher cache form {kind!r}; allowed: {', '.join(CACHE_KINDS)}")


def resolve_kind(setting: Any, *, hidden_size: int, vocab_size: int, dtype: torch.dtype,
                 topk: int | None = None) -> str | None:
    """`loss.teacher_cache` (+ `teacher_cache_topk`) -> None (no cache) | "hidden" | "logits" | "topk".

    ``true``/``auto`` choose the smaller exact form: the hidden states unless the full log-probs are smaller.
    A `topk` turns any enabled setting into the (approximate) top-k form.
    """
    if setting in (False, None, "false", "none"):
        return None
    if setting not in CACHE_SETTINGS:
        raise ValueError(f"loss.teacher_cache={setting!r}: must be one of false, true, auto, hidden, logits")
    if topk is not None:
        return "topk"
    if setting in ("hidden", "logits"):
        return setting
    sizes = {kind: bytes_per_position(kind, hidden_size=hidden_size, vocab_size=vocab_size, dtype=dtype)
             for kind in ("hidden", "logits")}
    return "hidden" if sizes["hidden"] <= sizes["logits"] else "logits"


# --------------------------------------------------------------------------------------------- fingerprints
def examples_fingerprint(examples: Sequence[dict]) -> str:
    """Hash of the encoded (input_ids, labels) sequences: what the teacher is run on."""
    return token_digest((ex["input_ids"], ex["labels"]) for ex in examples)


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json")


def _model_dir(teacher_path: str | Path) -> Path:
    """The local directory holding the teacher's files: the path itself, or a hub id's cached snapshot."""
    path = Path(teacher_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download  # only for a hub id

        return Path(snapshot_download(str(teacher_path), local_files_only=True))
    except Exception as exc:  # not a directory, not in the local hub cache
        raise ValueError(f"teacher cache: cannot find the files of model.teacher.path={teacher_path} (neither a "
                         f"directory nor a hub id in the local cache): {exc}") from exc


def teacher_fingerprint(teacher_path: str | Path, cache_dir: str | Path | None = None) -> str:
    """Hash of the teacher's weights and config by content (a retrained or re-downloaded teacher differs; a copy of
    the same weights elsewhere matches). The file digests are the cell's input fingerprints' (memoised under
    `cache_dir`), so the weights are read once for both."""
    directory = _model_dir(teacher_path)
    files = sorted({f for pattern in _WEIGHT_PATTERNS for f in directory.glob(pattern) if f.is_file()})
    if not any(f.name != "config.json" for f in files):
        raise ValueError(f"teacher cache: no weight files (*.safetensors, *.bin) in {directory}")
    digests = DigestCache(cache_dir)
    digest = files_digest(files, directory, digests)
    digests.save()
    return digest


def cache_key(teacher_path: str | Path, examples: Sequence[dict], dtype: torch.dtype, kind: str,
              topk: int | None = None, cache_dir: str | Path | None = None) -> str:
    """Signature of everything the cached values depend on: teacher weights, encoded data, dtype and form."""
    return short_hash("|".join([FORMAT_VERSION, teacher_fingerprint(teacher_path, cache_dir),
                                examples_fingerprint(examples), str(dtype), kind,
                                str(topk if kind == "topk" else None)]), 16)


# --------------------------------------------------------------------------------------------- computing
def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: position t is scored when labels[t+1] is a response token (the last position never is)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = response_mask(labels)
    return mask


def is_partitioned(model: torch.nn.Module) -> bool:
    """True for a model whose parameters ZeRO-3 has partitioned across ranks (its forwards are collective)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def _batch_values(teacher: torch.nn.Module, batch: dict, kind: str, topk: int | None,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """One batch's cached values at its response positions (row order = example order)."""
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    mask = response_positions(batch["labels"]).to(device)
    if kind == "hidden":
        return {"values": final_hidden(teacher, ids, attn)[mask].cpu()}
    logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=attn).logits.float(), dim=-1)[mask]
    if kind == "logits":
        return {"values": logp.cpu()}
    top, idx = logp.topk(topk, dim=-1)
    return {"values": top.cpu(), "topk_ids": idx.to(torch.int32).cpu(),
            "tail_mass": (1.0 - top.exp().sum(-1)).clamp_min(0.0).cpu()}


def rebuild_topk(top: torch.Tensor, ids: torch.Tensor, tail_mass: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Log-probs [n, V] from the top-k form: the k cached log-probs at their ids, the tail mass spread evenly
    over the other V - k tokens (what a cell trains on; approximate)."""
    tail = (tail_mass / (vocab_size - top.shape[1])).clamp_min(1e-30).log()
    out = tail[:, None].expand(top.shape[0], vocab_size).clone()
    return out.scatter_(1, ids.long(), top)


def _dummy_forward(teacher: torch.nn.Module, device: torch.device) -> None:
    """A one-token forward: keeps a ZeRO-3 teacher's collective forwards in step across ranks."""
    with torch.no_grad():
        teacher(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))


def compute(teacher: torch.nn.Module, examples: Sequence[dict], *, pad_id: int, batch_size: int, kind: str,
            topk: int | None = None, device: torch.device, progress: bool = False) -> dict[str, torch.Tensor]:
    """Run the teacher over `examples` and return the cached tensors of form `kind` (one process, in memory)."""
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    out = _compute_batches(teacher, batches, pad_id=pad_id, kind=kind, topk=topk, device=device,
                           progress=progress, forwards=len(batches))
    return _join(out)


def _compute_batches(teacher, batches: list[Sequence[dict]], *, pad_id: int, kind: str, topk: int | None,
                     device: torch.device, progress: bool, forwards: int,
                     beat: Callable[[], None] | None = None) -> list[dict[str, torch.Tensor]]:
    """Values of each batch, then dummy forwards up to `forwards` in all (equal collective calls per rank);
    `beat` after each (the build lock's sign of progress to the cells waiting for it)."""
    teacher.eval()
    steps: Iterable[int] = range(forwards)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="teacher cache", unit="batch")
    out = []
    for i in steps:
        if i < len(batches):
            batch = collate_train(list(batches[i]), pad_id)
            values = _batch_values(teacher, batch, kind, topk, device)
            values["counts"] = response_positions(batch["labels"]).sum(dim=1)
            out.append(values)
        else:
            _dummy_forward(teacher, device)
        if beat is not None:
            beat()
    return out


def _join(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate batch values into one shard: offsets [n+1] (int64) and the per-position tensors."""
    counts = torch.cat([p["counts"] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    out = {"offsets": offsets}
    for name in (parts[0] if parts else {}):
        if name != "counts":
            out[name] = torch.cat([p[name] for p in parts]).contiguous()
    return out


def build_once(path: Path, compute: Callable[[], dict[str, torch.Tensor]], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Load the safetensors file at `path`, or `compute()` and write it first (single-file caches: seq-KD).

    One process computes at a time (a file lock next to it: cells that start together wait for the
    first, saying so, then read its file), the write is atomic (temp file + rename), and loading is weights-only.
    A file already there is read without the lock (the write was atomic: it is whole; the dir may be read-only).
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = BuildLock(Path(str(path) + ".lock"), wait_s=None, what=f"cache {path.name}")
        lock.acquire()
        try:
            if not path.exists():
                log.info("cache: computing %s", path.name)
                with atomic_path(path) as tmp:
                    save_file(compute(), str(tmp), metadata=metadata)
        finally:
            lock.release()
    else:
        log.info("cache: reusing %s", path.name)
    return load_file(str(path))  # safetensors: weights only, nothing executed


# --------------------------------------------------------------------------------------------- layout
def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write one shard and its checksum record (a test wraps this name: which rank wrote which shard)."""
    write_checked(tensors, path, metadata)


def _broadcast_str(text: str, group=None) -> str:
    """Rank 0's `text` on every rank (fixed-size uint8 tensor; no pickling)."""
    buf = torch.zeros(256, dtype=torch.uint8)
    if dist.get_rank() == 0:
        data = text.encode()
        buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src=0, group=group)
    return bytes(buf[buf != 0].tolist()).decode()


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(todo: list[dict] | None, failed: bool, root: Path, group) -> list[tuple[int, int]] | None:
    """Rank 0's plan on every rank: None (the cache is whole) or the example ranges of the shards to build (maybe
    none: only the index to write). When rank 0 `failed` the other ranks stop with one line (its error says why)."""
    rank, world = _distributed()
    ranges = None if todo is None else [(int(s["start"]), int(s["stop"])) for s in todo]
    if world == 1:
        return ranges
    head = torch.tensor([-2 if failed else -1 if ranges is None else len(ranges)], dtype=torch.int64)
    dist.broadcast(head, src=0, group=group)
    if int(head) == -2 and rank != 0:
        raise InputError(f"teacher cache {root}: rank 0 could not open or build it (its log says why)")
    if int(head) < 0:
        return None
    body = torch.tensor(ranges if rank == 0 else [(0, 0)] * int(head), dtype=torch.int64).reshape(-1, 2)
    if int(head):
        dist.broadcast(body, src=0, group=group)
    return [(a, b) for a, b in body.tolist()]


# --------------------------------------------------------------------------------------------- the cache
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class TeacherCache:
    """Cached teacher outputs for a fixed list of encoded examples, addressed by example index.

    `batch_hidden` (form ``hidden``) or `batch_logits` (``logits``, ``topk``) rebuild a collated batch's teacher
    tensor; values at unscored positions are 0 (every loss masks them out).
    """

    def __init__(self, root: Path, index: dict) -> None:
        self.root = Path(root)
        self.key: str = index["key"]
        self.kind: str = index["kind"]
        self.vocab_size: int = int(index["vocab_size"])
        self.hidden_size: int = int(index["hidden_size"])
        self.topk: int | None = index.get("topk")
        self._starts = [s["start"] for s in index["shards"]]
        self._stack = ExitStack()
        self._files = [self._stack.enter_context(safe_open(str(self.root / s["file"]), framework="pt"))
                       for s in index["shards"]]
        self._offsets = [f.get_tensor("offsets") for f in self._files]  # small: n+1 int64 per shard
        self.n_examples = int(index["n_examples"])
        self.dtype = _ST_DTYPES[self._files[0].get_slice("values").get_dtype()] if self._files else torch.float32

    def close(self) -> None:
        self._stack.close()

    @property
    def positions(self) -> int:
        """Response positions cached in all."""
        return int(sum(int(o[-1]) for o in self._offsets))

    @property
    def nbytes(self) -> int:
        """Size of the shard files on disk."""
        return sum(p.stat().st_size for p in self.root.glob("shard-*.safetensors"))

    # ---------------------------------------------------------------- build or load
    @classmethod
    def build_or_load(cls, cache_dir: Path, teacher: torch.nn.Module, teacher_path: str | Path,
                      examples: Sequence[dict], *, pad_id: int, batch_size: int, kind: str,
                      topk: int | None = None, device: torch.device, dtype: torch.dtype, progress: bool = True,
                      shard_examples: int = SHARD_EXAMPLES, wait_s: float | None = WAIT_S) -> "TeacherCache":
        """Open `<cache_dir>/teacher-<key>/`, building (or repairing) it first if it is not whole.

        Call on every rank of the cell. Rank 0 verifies the cache; a complete one whose shards verify is opened
        without the lock. Otherwise rank 0 takes the cache's lock (waiting for another cell that builds it, at
        most `wait_s` seconds without progress by that cell; None: for ever), verifies again, and every rank
        computes and writes its share of the shards still missing or damaged (rank r takes the r-th, r + world-th,
        ... of them); rank 0 publishes the index once all exist. A ZeRO-3 teacher's forwards are collective, so
        every rank makes the same number of them. Shards left by an interrupted build are verified and reused.
        """
        if kind not in CACHE_KINDS:
            raise ValueError(f"unknown teacher cache form {kind!r}; allowed: {', '.join(CACHE_KINDS)}")
        vocab, hidden = (int(x) for x in param_shape(output_head(teacher).weight))
        if kind == "topk" and not (isinstance(topk, int) and 1 <= topk < vocab):
            raise ValueError(f"loss.teacher_cache_topk={topk}: must be in [1, {vocab - 1}] or null for an exact form")
        rank, world = _distributed()
        # A long-timeout group for waiting while another cell builds this cache (rank 0 holds the lock, the
        # others wait for its word); the default group's short timeout stays for everything else.
        wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if world > 1 else None
        # The key hashes the teacher's weight files: read them once (rank 0), not once per rank.
        key = cache_key(teacher_path, examples, dtype, kind, topk, cache_dir) if rank == 0 else ""
        if world > 1:
            key = _broadcast_str(key, wait_group)
        root = Path(cache_dir) / f"teacher-{key}"
        lock = BuildLock(root.with_name(f"{root.name}.lock"), wait_s=wait_s, what=f"teacher cache {root.name}",
                         setting=WAIT_SETTING)
        try:
            shards, todo, failed = [], None, True
            try:
                if rank == 0:
                    shards, todo = plan_build(root, shard_plan(len(examples), world, shard_examples), len(examples),
                                              FORMAT_VERSION, lock)
                failed = False
            finally:
                ranges = _agree(todo, failed, root, wait_group)  # every rank hears rank 0's plan, or that it failed
            if ranges is not None:
                cls._build(teacher, teacher_path, examples, root, key, shards, ranges, pad_id=pad_id,
                           batch_size=batch_size, kind=kind, topk=topk, device=device, dtype=dtype,
                           progress=progress, heads=(vocab, hidden), lock=lock)
            elif rank == 0:
                log.info("teacher cache: reusing %s", root.name)
        finally:
            lock.release()
        if world > 1:
            dist.barrier()  # the index is written
            dist.destroy_process_group(wait_group)
        return cls(root, json.loads((root / "index.json").read_text()))

    @classmethod
    def _build(cls, teacher: torch.nn.Module, teacher_path: str | Path, examples: Sequence[dict], root: Path, key: str,
               shards: list[dict], ranges: list[tuple[int, int]], *, pad_id: int, batch_size: int, kind: str,
               topk: int | None, device: torch.device, dtype: torch.dtype, progress: bool, heads: tuple[int, int],
               lock: BuildLock) -> None:
        """Compute the shards `ranges` on every rank (each its share), then publish the index (rank 0: `shards`
        are all the cache's, from its plan)."""
        rank, world = _distributed()
        vocab, hidden = heads
        if rank == 0:
            log.info("teacher cache: computing %d of the %d shards of %s (%s, %d examples, %d ranks), then its index",
                     len(ranges), len(shards), root.name, kind, len(examples), world)
            root.mkdir(parents=True, exist_ok=True)
        if world > 1:
            dist.barrier()
        meta = {"key": key, "kind": kind, "dtype": str(dtype)}
        cls._build_share(teacher, examples, ranges[rank::world], root, meta, pad_id=pad_id, batch_size=batch_size,
                         kind=kind, topk=topk, device=device, progress=progress and rank == 0, beat=lock.beat)
        if world > 1:
            dist.barrier()  # every shard written (a failed rank surfaces within the default timeout)
        if rank == 0:
            rebuilt = {shard_name(a, b) for a, b in ranges}
            entries = [index_entry(root, s, s["file"] in rebuilt) for s in shards]
            atomic_write_json(root / "index.json", {
                "format": FORMAT_VERSION, "key": key, "kind": kind, "dtype": str(dtype),
                "topk": topk if kind == "topk" else None, "vocab_size": vocab, "hidden_size": hidden,
                "n_examples": len(examples), "teacher_path": str(teacher_path), "shards": entries})

    @staticmethod
    def _build_share(teacher, examples, shards, root: Path, meta: dict[str, str], *, pad_id, batch_size, kind,
                     topk, device, progress, beat: Callable[[], None]) -> None:
        """Compute and write this rank's shards (the example ranges `shards`)."""
        batches = {(a, b): [examples[i:min(i + batch_size, b)] for i in range(a, b, batch_size)] for a, b in shards}
        n_forwards = sum(len(v) for v in batches.values())
        if is_partitioned(teacher) and dist.is_initialized():
            most = torch.tensor([n_forwards], dtype=torch.int64, device=device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            n_forwards = int(most.item())
        flat = [(shard, batch) for shard, bs in batches.items() for batch in bs]
        parts = _compute_batches(teacher, [b for _, b in flat], pad_id=pad_id, kind=kind, topk=topk, device=device,
                                 progress=progress, forwards=n_forwards, beat=beat)
        done = 0
        for (a, b), bs in batches.items():
            tensors = _join(parts[done:done + len(bs)])
            done += len(bs)
            path = root / shard_name(a, b)
            try:
                _save_atomic(tensors, path, {**meta, "start": str(a), "stop": str(b)})
            except OSError as exc:
                raise InputError(f"teacher cache {root}: cannot write {path.name} ({exc.strerror or exc}): the cache "
                                 "dir (paths.cache_dir) must be writable to build or repair the cache, or use "
                                 "loss.teacher_cache=false (the live teacher)") from exc
            beat()

    # ---------------------------------------------------------------- reading
    def _locate(self, index: int) -> tuple[int, int, int]:
        """(shard, first row, end row) of example `index`."""
        if not 0 <= index < self.n_examples:
            raise IndexError(f"example {index} is outside the cache's {self.n_examples} examples")
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        offsets = self._offsets[shard]
        return shard, int(offsets[local]), int(offsets[local + 1])

    def _slice(self, shard: int, name: str, lo: int, hi: int) -> torch.Tensor:
        return self._files[shard].get_slice(name)[lo:hi]

    def rows(self, index: int) -> torch.Tensor:
        """Example `index`'s cached rows: hidden states [n, H], or rebuilt tau=1 log-probs [n, V]."""
        shard, lo, hi = self._locate(index)
        values = self._slice(shard, "values", lo, hi)
        if self.kind != "topk":
            return values
        return rebuild_topk(values, self._slice(shard, "topk_ids", lo, hi), self._slice(shard, "tail_mass", lo, hi),
                            self.vocab_size)

    def _batch(self, example_ids: Sequence[int], labels: torch.Tensor, width: int, dtype: torch.dtype):
        mask = response_positions(labels.cpu())
        out = torch.zeros(*labels.shape, width, dtype=dtype)
        for row, index in enumerate(example_ids):
            rows = self.rows(index)
            if rows.shape[0] != int(mask[row].sum()):
                raise ValueError(f"teacher cache {self.key}: example {index} has {rows.shape[0]} cached positions, "
                                 f"the batch scores {int(mask[row].sum())} (stale cache or different encoding)")
            out[row, mask[row]] = rows.to(dtype)
        return out.to(labels.device)

    def batch_hidden(self, example_ids: Sequence[int], labels: torch.Tensor) -> torch.Tensor:
        """Teacher final hidden states [B, T, H] for a collated batch (form ``hidden``; teacher dtype)."""
        if self.kind != "hidden":
            raise ValueError(f"teacher cache {self.key} holds {self.kind}, not hidden states: use batch_logits")
        return self._batch(example_ids, labels, self.hidden_size, self.dtype)

    def batch_logits(self, example_ids: Sequence[int], labels: torch.Tensor) -> torch.Tensor:
        """Teacher 'logits' [B, T, V] for a collated batch: cached tau=1 log-probs (forms ``logits``, ``topk``)."""
        if self.kind == "hidden":
            raise ValueError(f"teacher cache {self.key} holds hidden states: apply the teacher's output head "
                             "to batch_hidden (distill.models.OutputHead.logits)")
        return self._batch(example_ids, labels, self.vocab_size, torch.float32)
