"""Where a training step's sequences come from (`rollout=`): the seam before the teacher and the loss.

- ``offline``   the references of the training set (today's behaviour; the default).
- ``on_policy`` GKD (Agarwal et al., 2024; TRL ``GKDTrainer``): with probability ``lmbda`` per micro-batch,
                the batch's responses are sampled from the current student for the batch's own prompts.
- ``sgo``       DistiLLM's adaptive off-policy student-generated outputs (Ko et al., 2024; their
                ``finetune.py`` ``finetune()`` and ``distillm/buffer.py``): an adaptive threshold that rises
                when the dev loss rises, a replay buffer of generated sequences, and a replay schedule.
- ``seq_kd``    sequence-level KD (Kim & Rush, 2016): every training prompt gets one response sampled from the
                teacher, once per grid, cached on disk like the teacher cache and shared by every cell.

Everything here is a function of its arguments. The coins, the sampling seeds and the replay draws are
derived from (training seed, step, micro-batch[, rank]), never from a running RNG, so a resumed cell makes
exactly the draws an uninterrupted one would; what does carry across steps (the replay buffer, the SGO
threshold and the dev loss it compares with, the counters) is `Rollout.state_dict`, saved with every
checkpoint as safetensors + JSON (no pickle).

Generated responses become training examples of the same shape as `distill.data.encoding.encode_example`'s: the
prompt is labelled -100, the response is cut right after its first EOS (the EOS is a label once, whatever
follows is dropped), and the whole is capped at ``data.max_length``. They are collated, teacher-scored and
lossed exactly like reference examples; a teacher cache cannot serve them (it is addressed by training
example), so the live teacher scores generated micro-batches.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distill.options import REPLAY_RATIOS, ROLLOUTS
from distill.cell.identity import rollout_label
from distill.files import atomic_path
from distill.rollouts.sampling import coin, derived_seed, prompt_of, sample_examples

log = logging.getLogger(__name__)

SOURCES = ("offline", "generated", "replayed")
SGO_THRESHOLD_STEP = 0.1  # DistiLLM finetune.py: `adaptive_threshold += 0.1`, capped at 1.0
STATE_FORMAT = 1


# ------------------------------------------------------------------------------------------ SGO (DistiLLM)

def fresh_probability(threshold: float, replay_ratio: str, global_step: int, total_steps: int) -> float:
    """DistiLLM's `samp_threshold` (finetune.py, `finetune()`): the probability of generating fresh.

    decreasing: threshold x (1 - global_step / total); constant: threshold x 0.5;
    increasing: threshold x global_step / total. DistiLLM's global_step is 1-based (step s of 0..T-1
    passes s + 1). Between this and `threshold` a micro-batch is replayed from the buffer.
    """
    if replay_ratio == "constant":
        return threshold * 0.5
    if replay_ratio == "increasing":
        return threshold * global_step / total_steps
    if replay_ratio == "decreasing":
        return threshold * (1 - global_step / total_steps)
    raise ValueError(f"replay_ratio={replay_ratio!r}: must be one of {list(REPLAY_RATIOS)}")


def sgo_choice(r: float, threshold: float, fresh_p: float, buffer_len: int, capacity: int) -> str:
    """DistiLLM's branch for one micro-batch (finetune.py, the `if args.student_gen:` block).

    generate when r < fresh_p, or when r < threshold while the buffer is not yet full; replay when
    r < threshold otherwise; else the offline references.
    """
    if r < fresh_p or (r < threshold and buffer_len < capacity):
        return "generated"
    if r < threshold:
        return "replayed"
    return "offline"


def adapt_threshold(threshold: float, prev_loss: float, dev_loss: float, loss_eps: float) -> tuple[float, float]:
    """DistiLLM's update after each evaluation (finetune.py, `finetune()`): when the dev loss has risen by
    at least `loss_eps` over the reference loss, the threshold rises by 0.1 (capped at 1) and the
    reference becomes the current loss; otherwise nothing changes (the reference is NOT moved down).

    Returns (threshold, reference loss).
    """
    if dev_loss >= prev_loss + loss_eps:
        return min(threshold + SGO_THRESHOLD_STEP, 1.0), dev_loss
    return threshold, prev_loss


def on_policy_choice(r: float, lmbda: float) -> str:
    """GKD: a micro-batch's responses are the student's own samples with probability `lmbda`."""
    return "generated" if r < lmbda else "offline"


class ReplayBuffer:
    """DistiLLM's replay buffer (distillm/buffer.py `ReplayBuffer`): a FIFO of the last `capacity` generated
    sequences (deque(maxlen=capacity)); `sample` draws k of them uniformly without replacement
    (`random.sample`), here from a seeded RNG so that a resumed run draws the same ones."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity={capacity}: must be >= 1")
        self.capacity = capacity
        self.items: deque[dict[str, Any]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    def push(self, examples: Iterable[dict[str, Any]]) -> None:
        """Append (the oldest fall out once full)."""
        self.items.extend(examples)

    def sample(self, k: int, seed: int) -> list[dict[str, Any]]:
        """k distinct stored sequences, drawn by `random.Random(seed)`."""
        if k > len(self.items):
            raise ValueError(f"cannot replay {k} sequences from a buffer holding {len(self.items)}")
        return random.Random(seed).sample(list(self.items), k)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The buffer as flat int64 tensors (safetensors-ready): concatenated ids/labels + lengths."""
        items = list(self.items)
        flat = lambda key: torch.tensor([t for e in items for t in e[key]], dtype=torch.int64)  # noqa: E731
        return {"input_ids": flat("input_ids"), "labels": flat("labels"),
                "lengths": torch.tensor([len(e["input_ids"]) for e in items], dtype=torch.int64),
                "prompt_lengths": torch.tensor([e["prompt_length"] for e in items], dtype=torch.int64)}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the contents with those of `state_tensors`' output."""
        ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
        self.items.clear()
        start = 0
        for n, p in zip(tensors["lengths"].tolist(), tensors["prompt_lengths"].tolist()):
            self.items.append({"input_ids": ids[start:start + n], "labels": labels[start:start + n], "prompt_length": p})
            start += n


# ------------------------------------------------------------------------------------------ the rollout

@dataclass
class MicroBatch:
    """The sequences of one micro-batch and where they came from.

    `example_ids` are training-set indices (what a teacher cache is addressed by); None for generated or
    replayed sequences, which the live teacher must score.
    """

    examples: list[dict[str, Any]]
    source: str
    example_ids: list[int] | None = None


class Rollout:
    """Supplies a training step's micro-batches and carries what must survive across steps.

    One per cell (and rank). `micro_batches` is called once per step with the step's offline example
    indices; `observe_dev_loss` after each validation (SGO adapts its threshold there).
    """

    def __init__(self, cfg: Mapping[str, Any], *, seed: int, max_steps: int, pad_id: int, eos_id: int,
                 max_length: int, synced_gpus: bool = False) -> None:
        self.cfg = dict(cfg)
        self.name = self.cfg.get("name", "offline")
        if self.name not in ROLLOUTS:
            raise ValueError(f"rollout={self.name!r}: must be one of {list(ROLLOUTS)}")
        self.seed, self.max_steps = int(seed), int(max_steps)
        self.pad_id, self.eos_id, self.max_length = pad_id, eos_id, int(max_length)
        self.synced_gpus = synced_gpus
        self.counts: Counter[str] = Counter()
        self.generated_tokens = 0
        self.buffer = ReplayBuffer(int(self.cfg["capacity"])) if self.name == "sgo" else None
        self.threshold = float(self.cfg.get("init_threshold", 0.0)) if self.name == "sgo" else None
        self.prev_loss: float | None = None  # SGO's reference dev loss (DistiLLM's prev_avg_loss)

    @property
    def samples_student(self) -> bool:
        """Whether some micro-batches are generated by the student (on_policy, sgo)."""
        return self.name in ("on_policy", "sgo")

    @property
    def stateful(self) -> bool:
        """Whether anything must be checkpointed (counters, and for SGO the buffer and threshold)."""
        return self.samples_student

    @property
    def needs_initial_dev_loss(self) -> bool:
        """SGO compares dev losses with the one before training (DistiLLM evaluates at step 0)."""
        return self.name == "sgo" and self.prev_loss is None

    def choose(self, step: int, micro: int) -> str:
        """The source of micro-batch `micro` of `step` (identical on every rank: generation under ZeRO-3
        is collective, so all ranks must generate together)."""
        if self.name == "on_policy":
            return on_policy_choice(coin("coin", self.seed, step, micro), float(self.cfg["lmbda"]))
        if self.name == "sgo":
            fresh = fresh_probability(self.threshold, self.cfg["replay_ratio"], step + 1, self.max_steps)
            return sgo_choice(coin("coin", self.seed, step, micro), self.threshold, fresh, len(self.buffer),
                              self.buffer.capacity)
        return "offline"

    def micro_batches(self, step: int, ids: Sequence[Sequence[int]], train_examples: Sequence[dict[str, Any]],
                      policy: torch.nn.Module | None = None, rank: int = 0) -> list[MicroBatch]:
        """The step's micro-batches: `ids[m]` are micro-batch m's training-set indices on this rank; each
        becomes the references, the student's samples for the same prompts, or a replay draw."""
        out = []
        for micro, idx in enumerate(ids):
            source = self.choose(step, micro)
            offline = [train_examples[i] for i in idx]
            if source == "generated":
                examples = sample_examples(
                    policy, [prompt_of(e) for e in offline], sampling=self.cfg["sampling"],
                    seed=derived_seed("sample", self.seed, step, micro, rank), pad_id=self.pad_id,
                    eos_id=self.eos_id, max_length=self.max_length, synced_gpus=self.synced_gpus,
                )
                self.generated_tokens += sum(len(e["input_ids"]) - e["prompt_length"] for e in examples)
                if self.buffer is not None:
                    self.buffer.push(examples)
                out.append(MicroBatch(examples, source))
            elif source == "replayed":
                out.append(MicroBatch(self.buffer.sample(len(idx), derived_seed("replay", self.seed, step, micro, rank)),
                                      source))
            else:
                out.append(MicroBatch(offline, source, list(idx)))
            self.counts[source] += 1
        return out

    def observe_dev_loss(self, dev_loss: float) -> None:
        """After a validation: SGO's first call sets the reference, later ones may raise the threshold."""
        if self.name != "sgo":
            return
        if self.prev_loss is None:
            self.prev_loss = float(dev_loss)
            return
        self.threshold, self.prev_loss = adapt_threshold(self.threshold, self.prev_loss, float(dev_loss),
                                                         float(self.cfg["loss_eps"]))

    def summary(self) -> dict[str, Any]:
        """What the cell reports: micro-batches per source, generated tokens, SGO threshold and buffer size."""
        out: dict[str, Any] = {"name": self.name, "label": rollout_label(self.cfg),
                               "micro_batches": {s: int(self.counts[s]) for s in SOURCES},
                               "generated_tokens": int(self.generated_tokens)}
        if self.name == "sgo":
            out.update(threshold=self.threshold, buffer=len(self.buffer), reference_dev_loss=self.prev_loss)
        return out

    def log_values(self) -> dict[str, float]:
        """Scalars for the step log (W&B `rollout/...`); none for offline rollouts."""
        if not self.samples_student:
            return {}
        total = max(sum(self.counts.values()), 1)
        out = {f"rollout/{s}_frac": self.counts[s] / total for s in SOURCES if s != "offline"}
        if self.name == "sgo":
            out.update({"rollout/threshold": self.threshold, "rollout/buffer": float(len(self.buffer))})
        return out

    # -------------------------------------------------------------------- checkpoint state (no pickle)
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able meta): the replay buffer as int64 tensors; threshold, reference loss, counters."""
        meta = {"format": STATE_FORMAT, "name": self.name, "threshold": self.threshold, "prev_loss": self.prev_loss,
                "counts": dict(self.counts), "generated_tokens": self.generated_tokens}
        tensors = {f"buffer.{k}": v for k, v in self.buffer.state_tensors().items()} if self.buffer is not None else {}
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (refuses another rollout's state)."""
        if meta.get("format") != STATE_FORMAT or meta.get("name") != self.name:
            raise ValueError(f"rollout state is {meta.get('name')!r} (format {meta.get('format')}), "
                             f"this cell's rollout is {self.name!r} (format {STATE_FORMAT})")
        self.threshold, self.prev_loss = meta["threshold"], meta["prev_loss"]
        self.counts = Counter({k: int(v) for k, v in meta["counts"].items()})
        self.generated_tokens = int(meta["generated_tokens"])
        if self.buffer is not None:
            self.buffer.load_tensors({k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")})

    @staticmethod
    def state_path(directory: Path, rank: int) -> Path:
        return Path(directory) / f"rollout-rank{rank:05d}.safetensors"

    def save(self, directory: Path, rank: int) -> Path:
        """Write this rank's state atomically into `directory` (a checkpoint tag dir)."""
        path = self.state_path(directory, rank)
        tensors, meta = self.state_dict()
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"state": json.dumps(meta)})
        return path

    def load(self, directory: Path, rank: int) -> None:
        """Restore this rank's state from `directory`; a missing file is an error (the cell cannot resume
        as the unkilled run would without it)."""
        path = self.state_path(directory, rank)
        if not path.exists():
            raise FileNotFoundError(f"{path}: the checkpoint has no rollout state for rank {rank}; "
                                    "rerun the cell from scratch with force=true")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.load_state_dict(tensors, meta)
