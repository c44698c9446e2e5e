"""The embedded default data: generated instruction tasks + a locally trained tokenizer.

Nothing here touches the network. `generate_suite` turns a handful of generator parameters into
train / valid / test splits plus two distribution-shifted eval sets:

- ``shift_wording``: same task parameters as ``test``, but instruction phrasings never seen in training;
- ``shift_long``:    training phrasings, but longer inputs / bigger numbers / more words.

Every example carries 2-3 *paraphrased* reference answers ("The answer is 42." / "42" /
"It equals 42."). Training picks one per example with `Record.target_index` (a hash, so the
choice is unpredictable from the prompt); the teacher therefore learns a genuinely multi-modal
next-token distribution, which is what lets forward and reverse KL behave differently. All
paraphrases are kept as references for ROUGE-L (max over references).

`prepare_embedded` writes everything (JSONL in the MiniLLM schema, meta.json, and a byte-level
BPE tokenizer saved as a Hugging Face tokenizer dir) into a cache dir named by a hash of the
generator parameters, vocab size and `CODE_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from distill.data.records import Record
from distill.data.encoding import render_prompt
from distill.data.task_families import FAMILIES, Example
from distill.files import atomic_path

# Bump when the generator or tokenizer code changes: it is part of the cache dir name.
CODE_VERSION = 1

SPLITS = ("train", "valid", "test", "shift_wording", "shift_long")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# A minimal chat template so `template="chat"` also works with the embedded tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_PARAMS = {"seed": 1234, "n_train": 4000, "n_valid": 200, "n_test": 200, "n_shift": 200}
SUITE_FILES = tuple(f"{s}.jsonl" for s in SPLITS) + ("meta.json", "tokenizer/tokenizer.json")

# ----------------------------------------------------------------------------------------------
# generation


def _split_plan(params: Mapping[str, int]) -> list[tuple[str, int, bool, bool]]:
    """(split, size, held-out phrasings?, long?) in generation order (train first)."""
    n_shift = params["n_shift"]
    return [
        ("train", params["n_train"], False, False),
        ("valid", params["n_valid"], False, False),
        ("test", params["n_test"], False, False),
        ("shift_wording", n_shift, True, False),
        ("shift_long", n_shift, False, True),
    ]


def generator_params(gen_cfg: Mapping[str, Any] | None) -> dict[str, int]:
    """Validated generator parameters (defaults filled in); unknown keys are an error."""
    params = dict(DEFAULT_PARAMS)
    for k, v in dict(gen_cfg or {}).items():
        if k not in DEFAULT_PARAMS:
            raise ValueError(f"unknown data.generator key {k!r}; allowed: {sorted(DEFAULT_PARAMS)}")
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "seed" else 1):
            kind = "non-negative" if k == "seed" else "positive"
            raise ValueError(f"data.generator.{k} must be a {kind} int, got {v!r}")
        params[k] = v
    return params


def generate_suite(params: Mapping[str, int]) -> dict[str, list[Example]]:
    """Generate all splits deterministically from ``params`` (see `generator_params`).

    Families are interleaved round-robin so every split is balanced; a problem (its key) never
    appears in two splits, nor twice in one.
    """
    params = generator_params(params)
    seen: set[tuple] = set()
    suite: dict[str, list[Example]] = {}
    for split_idx, (split, size, held_out, long) in enumerate(_split_plan(params)):
        rng = random.Random(params["seed"] * 1009 + split_idx)
        examples = []
        for i in range(size):
            fam = FAMILIES[i % len(FAMILIES)]
            for _attempt in range(1000):
                key, fields, inp, outs = fam.make(rng, long)
                if key not in seen:
                    break
            else:  # pragma: no cover - only with absurd split sizes
                raise ValueError(f"family {fam.name!r} ran out of distinct problems for split {split!r} (size {size})")
            seen.add(key)
            phrasings = fam.shift_phrasings if held_out else fam.train_phrasings
            instruction = rng.choice(phrasings).format(**fields)
            examples.append(Example(Record(instruction, inp, outs, task=fam.name), key))
        suite[split] = examples
    return suite


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE on ``texts``; return a `PreTrainedTokenizerFast` with EOS and PAD.

    Digits are split into single characters before BPE (arithmetic stays learnable and numbers
    never merge with their neighbours); a ByteLevel pre-tokenizer + decoder makes decode(encode(x))
    == x exactly, spaces and newlines included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"tokenizer_vocab_size must be >= 260 (256 bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tokenizer_corpus(records: list[Record]) -> list[str]:
    """Training text for the tokenizer: each rendered Alpaca prompt followed by every reference."""
    return [render_prompt(r, "alpaca") + "\n".join(r.outputs) for r in records]


# ----------------------------------------------------------------------------------------------
# cache dir


def suite_hash(params: Mapping[str, int], vocab_size: int) -> str:
    """Short hash naming the cache dir: generator params + vocab size + code version."""
    blob = json.dumps({"generator": dict(sorted(params.items())), "vocab": vocab_size, "code": CODE_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def is_complete(suite_dir: Path) -> bool:
    """True when every file of a built suite is present (meta.json is written last)."""
    return all((suite_dir / f).is_file() for f in SUITE_FILES)


def _write_jsonl(path: Path, records: list[Record]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")


def _build(out: Path, name: str, params: dict[str, int], vocab_size: int) -> None:
    """Write the whole suite ``name`` into the (fresh, empty) dir ``out``."""
    suite = generate_suite(params)
    splits = {s: [e.record for e in exs] for s, exs in suite.items()}
    for split, records in splits.items():
        _write_jsonl(out / f"{split}.jsonl", records)
    tok = train_tokenizer(tokenizer_corpus(splits["train"]), vocab_size)
    tok.save_pretrained(str(out / "tokenizer"))

    def n_tokens(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    stats = {}
    for split, records in splits.items():
        stats[split] = {
            "n": len(records),
            "tasks": dict(sorted(Counter(r.task for r in records).items())),
            "max_prompt_tokens": max(n_tokens(render_prompt(r, "alpaca")) for r in records),
            "max_response_tokens": max(n_tokens(o) + 1 for r in records for o in r.outputs),  # + EOS
        }
    meta = {
        "name": name,
        "code_version": CODE_VERSION,
        "generator": params,
        "tokenizer_vocab_size": vocab_size,
        "tokenizer_len": len(tok),
        "families": [f.name for f in FAMILIES],
        "splits": stats,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def prepare_embedded(data_cfg: Mapping[str, Any], data_root: Path) -> Path:
    """Build (or reuse) the embedded suite under ``data_root/embedded-<hash>/`` and return that dir.

    Reads ``data_cfg.generator`` (seed, n_train, n_valid, n_test, n_shift) and
    ``data_cfg.tokenizer_vocab_size``. The dir holds train/valid/test/shift_wording/shift_long.jsonl
    (MiniLLM schema, ``output`` = list of paraphrases), meta.json and tokenizer/. It is built in a
    temp dir next to the target and renamed into place under a file lock, so concurrent callers
    (several grid cells starting at once) build it once and never see a half-written suite.
    """
    gen = data_cfg.get("generator") if hasattr(data_cfg, "get") else None
    if gen is not None and not isinstance(gen, Mapping):
        try:  # OmegaConf DictConfig -> plain dict
            from omegaconf import OmegaConf

            gen = OmegaConf.to_container(gen, resolve=True)
        except Exception as e:  # pragma: no cover
            raise ValueError(f"data.generator must be a mapping, got {type(gen).__name__}") from e
    params = generator_params(gen)
    vocab_size = int(data_cfg.get("tokenizer_vocab_size", 512))
    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    final = data_root / f"embedded-{suite_hash(params, vocab_size)}"
    if is_complete(final):
        return final
    with FileLock(str(final) + ".lock"):
        if is_complete(final):  # another process finished it while we waited
            return final
        with atomic_path(final) as tmp:  # an incomplete leftover (e.g. deleted files) is replaced
            tmp.mkdir()
            _build(tmp, final.name, params, vocab_size)
    return final
