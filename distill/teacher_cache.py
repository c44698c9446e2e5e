"""The frozen teacher, paid once per grid: its log-probs at every response position, cached on disk.

Every cell of a tau x divergence grid runs the same teacher over the same teacher-forced sequences, so
the teacher's outputs are computed once per (teacher weights, encoded training set, dtype, top-k) and
reused by every cell that shares them. The file is built under a lock (cells that start together wait
for the first), written atomically, and named by the signature of those inputs (a stale file cannot
match). Stored values are tau=1 log-probs; any tau is recovered exactly, since
softmax(log_softmax(z) / tau) = softmax(z / tau).

Two forms:
- full (`topk=None`): float32 log-probs over the whole vocabulary. Exact. For the embedded default
  (vocab 512, ~50k response tokens) that is ~100 MB.
- top-k (`topk=k`): the k largest log-probs and their ids, plus the tail mass 1 - sum(top-k), spread
  uniformly over the other V - k tokens when the logits are rebuilt. The top-k part is exact; the tail
  keeps its total mass but loses its shape, which is precisely the non-dominant signal that a higher tau
  amplifies. `benchmarks/bench_teacher_cache.py` measures the loss error against the exact teacher.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"


def examples_fingerprint(examples: Sequence[dict]) -> str:
    """Hash of the encoded (input_ids, labels) sequences: what the teacher is run on."""
    h = hashlib.sha1()
    for ex in examples:
        h.update(torch.tensor(ex["input_ids"], dtype=torch.int64).numpy().tobytes())
        h.update(torch.tensor(ex["labels"], dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def teacher_fingerprint(teacher_path: str | Path) -> str:
    """Identify teacher weights by their files' names, sizes and mtimes (cheap; a retrained teacher differs)."""
    path = Path(teacher_path)
    parts = [str(path.resolve())]
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + [path / "config.json"]:
        if f.exists():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def cache_key(teacher_path: str | Path, examples: Sequence[dict], dtype: torch.dtype, topk: int | None) -> str:
    """Signature of everything the cached values depend on."""
    blob = "|".join([FORMAT_VERSION, teacher_fingerprint(teacher_path), examples_fingerprint(examples),
                     str(dtype), str(topk)])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: position t is scored when labels[t+1] is a response token (the last position never is)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


@torch.no_grad()
def compute(teacher: torch.nn.Module, examples: Sequence[dict], *, pad_id: int, batch_size: int,
            topk: int | None, device: torch.device, progress: bool = False) -> dict[str, torch.Tensor]:
    """Run the teacher over `examples` and keep its tau=1 log-probs at the response positions."""
    from distill.data import collate_train

    offsets = [0]
    chunks: list[torch.Tensor] = []
    ids_chunks: list[torch.Tensor] = []
    tails: list[torch.Tensor] = []
    batches = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="teacher cache", unit="batch")
    teacher.eval()
    for start in batches:
        batch = collate_train(examples[start:start + batch_size], pad_id)
        logits = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        mask = response_positions(batch["labels"]).to(device)
        logp = torch.log_softmax(logits.float(), dim=-1)[mask]  # [P, V], row order = example order
        for n in mask.sum(dim=1).tolist():
            offsets.append(offsets[-1] + n)
        if topk is None:
            chunks.append(logp.cpu())
        else:
            top, idx = logp.topk(topk, dim=-1)
            chunks.append(top.cpu())
            ids_chunks.append(idx.to(torch.int32).cpu())
            tails.append((1.0 - top.exp().sum(-1)).clamp_min(0.0).cpu())
    out = {"offsets": torch.tensor(offsets, dtype=torch.int64), "logprobs": torch.cat(chunks)}
    if topk is not None:
        out["topk_ids"] = torch.cat(ids_chunks)
        out["tail_mass"] = torch.cat(tails)
    return out


def build_once(path: Path, compute: Callable[[], dict[str, torch.Tensor]], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Load the safetensors file at `path`, or `compute()` and write it first.

    One process computes at a time (a file lock next to it: cells that start together wait for the
    first, then read its file), the write is atomic (temp file + rename), and loading is weights-only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            log.info("cache: computing %s", path.name)
            tensors = compute()
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        else:
            log.info("cache: reusing %s", path.name)
    return load_file(str(path))  # safetensors: weights only, nothing executed


class TeacherCache:
    """Cached teacher log-probs for a fixed list of encoded examples, addressed by example index."""

    def __init__(self, tensors: dict[str, torch.Tensor], vocab_size: int, key: str) -> None:
        self.offsets = tensors["offsets"]
        self.logprobs = tensors["logprobs"]
        self.topk_ids = tensors.get("topk_ids")
        self.tail_mass = tensors.get("tail_mass")
        self.vocab_size = vocab_size
        self.key = key

    @classmethod
    def build_or_load(cls, cache_dir: Path, teacher: torch.nn.Module, teacher_path: str | Path,
                      examples: Sequence[dict], *, pad_id: int, batch_size: int, topk: int | None,
                      device: torch.device, dtype: torch.dtype, progress: bool = True) -> "TeacherCache":
        """Load `<cache_dir>/teacher-<key>.safetensors`, or compute and write it (one process at a time)."""
        vocab = teacher.get_output_embeddings().weight.shape[0]
        if topk is not None and not 1 <= topk < vocab:
            raise ValueError(f"loss.teacher_cache_topk={topk}: must be in [1, {vocab - 1}] or null for full log-probs")
        key = cache_key(teacher_path, examples, dtype, topk)
        tensors = build_once(
            Path(cache_dir) / f"teacher-{key}.safetensors",
            lambda: compute(teacher, examples, pad_id=pad_id, batch_size=batch_size, topk=topk, device=device,
                            progress=progress),
            {"key": key, "vocab_size": str(vocab), "topk": str(topk)},
        )
        if len(tensors["offsets"]) != len(examples) + 1:
            raise ValueError(f"teacher cache {path} holds {len(tensors['offsets']) - 1} examples, expected {len(examples)}")
        return cls(tensors, vocab, key)

    def rows(self, index: int) -> torch.Tensor:
        """Rebuilt tau=1 log-probs [n_positions, V] of example `index`."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        if self.topk_ids is None:
            return self.logprobs[lo:hi]
        k = self.topk_ids.shape[1]
        tail = (self.tail_mass[lo:hi] / (self.vocab_size - k)).clamp_min(1e-30).log()
        out = tail[:, None].expand(hi - lo, self.vocab_size).clone()
        return out.scatter_(1, self.topk_ids[lo:hi].long(), self.logprobs[lo:hi])

    def batch_logits(self, example_ids: Sequence[int], labels: torch.Tensor) -> torch.Tensor:
        """Teacher 'logits' [B, T, V] for a collated batch: cached log-probs at response positions, 0 elsewhere.

        Unscored positions are masked out of every loss, so their value only has to be finite.
        """
        mask = response_positions(labels.cpu())
        out = torch.zeros(*labels.shape, self.vocab_size, dtype=torch.float32)
        for row, index in enumerate(example_ids):
            rows = self.rows(index)
            if rows.shape[0] != int(mask[row].sum()):
                raise ValueError(f"teacher cache {self.key}: example {index} has {rows.shape[0]} cached positions, "
                                 f"the batch scores {int(mask[row].sum())} (stale cache or different encoding)")
            out[row, mask[row]] = rows
        return out.to(labels.device)
