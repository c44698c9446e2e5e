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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from distill.data.records import Record
from distill.data.encoding import render_prompt
from distill.files import atomic_path

# Bump when the generator or tokenizer recipe changes: it is part of the cache dir name.
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
# word pools (one pool for all splits: the shifts are in wording and length, not vocabulary)

WORDS = (
    "apple river stone cloud garden window candle forest pepper silver rocket valley "
    "butter castle dragon meadow pencil rabbit summer tunnel violin winter yellow basket "
    "bottle carpet dinner engine finger hammer island jacket kitten ladder mirror needle "
    "orange planet pocket rubber saddle ticket turtle wallet zipper anchor banana cherry "
    "falcon guitar harbor lemon marble nutmeg oyster pillow quartz salmon tomato walnut"
).split()
NAMES = {  # name -> (subject pronoun, possessive)
    **{n: ("She", "Her") for n in "Maya Lena Sofia Priya Hana Amara Nadia Ines".split()},
    **{n: ("He", "His") for n in "Omar Tariq Jonas Mateo Felix Viktor Leo Kofi".split()},
}
CITIES = "Paris Lima Oslo Cairo Seoul Quito Dublin Nairobi Lisbon Hanoi Austin Perth Riga Accra".split()
JOBS = "baker nurse pilot farmer teacher painter chef plumber lawyer dentist tailor sailor".split()
PETS = "cat dog parrot hamster turtle rabbit goldfish lizard".split()
COLORS = "red blue green yellow purple orange black white brown grey pink silver".split()
ANIMALS = "fox bear owl otter mouse wolf frog goat duck horse tiger whale deer crab panda".split()
VERBS = "run swim sing dance climb read paint jump sleep cook fly dig".split()
PLACES = "forest river town meadow harbor desert garden mountain".split()
TIMES = "morning evening night afternoon weekend summer".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()
UNITS = (  # (from, to, short symbol of `to`, factor)
    ("kilometers", "meters", "m", 1000),
    ("meters", "centimeters", "cm", 100),
    ("kilograms", "grams", "g", 1000),
    ("hours", "minutes", "min", 60),
    ("minutes", "seconds", "s", 60),
    ("days", "hours", "h", 24),
    ("weeks", "days", "d", 7),
    ("liters", "milliliters", "ml", 1000),
    ("meters", "millimeters", "mm", 1000),
    ("dollars", "cents", "cents", 100),
)


@dataclass(frozen=True)
class Example:
    """A generated record plus its canonical problem key (used to keep splits disjoint)."""

    record: Record
    key: tuple


@dataclass(frozen=True)
class Family:
    """One task family: phrasings seen in training, held-out phrasings, and a problem maker.

    ``make(rng, long)`` returns ``(key, fields, input, outputs)``; ``fields`` fill the phrasing
    template (``str.format``), ``key`` identifies the underlying problem independent of wording.
    """

    name: str
    train_phrasings: tuple[str, ...]
    shift_phrasings: tuple[str, ...]
    make: Callable[[random.Random, bool], tuple[tuple, dict, str, tuple[str, ...]]]


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _make_add(rng, long):
    hi_lo = (100, 9999) if long else (0, 99)
    a, b = rng.randint(*hi_lo), rng.randint(*hi_lo)
    c = a + b
    return ("add", a, b), {"a": a, "b": b}, "", (f"The answer is {c}.", f"{c}", f"It equals {c}.")


def _make_subtract(rng, long):
    hi_lo = (100, 9999) if long else (0, 99)
    a, b = sorted((rng.randint(*hi_lo), rng.randint(*hi_lo)), reverse=True)
    c = a - b
    return ("sub", a, b), {"a": a, "b": b}, "", (f"The answer is {c}.", f"{c}", f"It equals {c}.")


def _make_reverse(rng, long):
    ws = _words(rng, 6, 7) if long else _words(rng, 3, 5)
    r = ws[::-1]
    outs = (" ".join(r), ", ".join(r), "The reversed order is: " + " ".join(r) + ".")
    return ("rev", tuple(ws)), {}, " ".join(ws), outs


def _make_sort(rng, long):
    ws = _words(rng, 6, 7) if long else _words(rng, 3, 5)
    s = sorted(ws)
    outs = (" ".join(s), ", ".join(s), "In alphabetical order: " + " ".join(s) + ".")
    return ("sort", tuple(ws)), {}, " ".join(ws), outs


def _make_count_words(rng, long):
    ws = [rng.choice(WORDS) for _ in range(rng.randint(9, 12) if long else rng.randint(3, 7))]
    n = len(ws)
    sentence = " ".join(ws).capitalize() + "."
    outs = (f"There are {n} words.", f"{n}", f"The sentence has {n} words.")
    return ("cw", sentence), {}, sentence, outs


def _make_count_letter(rng, long):
    text = " ".join(rng.sample(WORDS, 3)) if long else rng.choice(WORDS)
    # mostly letters that occur (counts 1..4), sometimes absent ones (count 0)
    present = sorted(set(text.replace(" ", "")))
    letter = rng.choice(present) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    n = text.count(letter)
    times = "time" if n == 1 else "times"
    outs = (f"The letter '{letter}' appears {n} {times}.", f"{n}", f"It appears {n} {times}.")
    return ("cl", letter, text), {"letter": letter, "text": text}, "", outs


def _make_convert(rng, long):
    src, dst, sym, factor = rng.choice(UNITS)
    v = rng.randint(100, 999) if long else rng.randint(1, 99)
    r = v * factor
    outs = (f"{v} {src} is {r} {dst}.", f"{r} {dst}", f"That is {r} {sym}.")
    return ("conv", src, dst, v), {"v": v, "src": src, "dst": dst}, "", outs


def _make_date(rng, long):
    # long = years far outside the training range (bigger numbers / unseen centuries)
    year = rng.choice([rng.randint(1600, 1899), rng.randint(2100, 2400)]) if long else rng.randint(1950, 2030)
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    m = MONTHS[month - 1]
    outs = (f"{m} {day}, {year}", f"{day} {m} {year}", f"The date is {m} {day}, {year}.")
    return ("date", year, month, day), {}, f"{year:04d}-{month:02d}-{day:02d}", outs


def _person(rng, name):
    pron, poss = NAMES[name]
    facts = {
        "city": (f"{name} lives in {{}}.", rng.choice(CITIES)),
        "job": (f"{pron} works as a {{}}.", rng.choice(JOBS)),
        "pet": (f"{pron} has a pet {{}}.", rng.choice(PETS)),
        "color": (f"{poss} favourite colour is {{}}.", rng.choice(COLORS)),
    }
    return facts


QUESTIONS = {  # attribute -> (question, answers given the value)
    "city": ("Where does {n} live?", ("{n} lives in {v}.", "In {v}.", "{v}")),
    "job": ("What is {n}'s job?", ("{n} works as a {v}.", "A {v}.", "{n} is a {v}.")),
    "pet": ("What pet does {n} have?", ("{n} has a {v}.", "A {v}.", "{n}'s pet is a {v}.")),
    "color": ("What is {n}'s favourite colour?", ("{n}'s favourite colour is {v}.", "{v}", "It is {v}.")),
}


def _make_qa(rng, long):
    # long: a second person's facts as distractors
    people = rng.sample(sorted(NAMES), 2 if long else 1)
    sentences, facts_of = [], {}
    for n in people:
        facts = _person(rng, n)
        attrs = ["city"] + rng.sample(["job", "pet", "color"], 2)  # city first: it names the person
        sentences += [facts[a][0].format(facts[a][1]) for a in attrs]
        facts_of[n] = {a: facts[a][1] for a in attrs}
    n = rng.choice(people)
    attr = rng.choice(sorted(facts_of[n]))
    v = facts_of[n][attr]
    q, answers = QUESTIONS[attr]
    paragraph = " ".join(sentences)
    outs = tuple(a.format(n=n, v=v) for a in answers)
    return ("qa", paragraph, n, attr), {"q": q.format(n=n)}, paragraph, outs


def _make_describe(rng, long):
    c, a, v = rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(VERBS)
    what = f"to {v}"
    if long:  # more attributes to carry over into the answer
        what = f"to {v} in the {rng.choice(PLACES)} every {rng.choice(TIMES)}"
    outs = (
        f"The {c} {a} likes {what}.",
        f"A {c} {a} who loves {what}.",
        f"There once was a {c} {a} that liked {what}.",
    )
    return ("desc", c, a, what), {"c": c, "a": a, "what": what}, "", outs


def _make_max(rng, long):
    k, hi = (rng.randint(6, 7), 999) if long else (rng.randint(3, 5), 99)
    xs = rng.sample(range(hi + 1), k)
    m = max(xs)
    outs = (f"The largest number is {m}.", f"{m}", f"It is {m}.")
    return ("max", tuple(xs)), {}, ", ".join(map(str, xs)), outs


FAMILIES: tuple[Family, ...] = (
    Family(
        "add",
        ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "Calculate the sum of {a} and {b}."),
        ("If you combine {a} and {b}, what total do you get?", "Tell me the total of {a} and {b}."),
        _make_add,
    ),
    Family(
        "subtract",
        ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.", "Calculate {a} take away {b}."),
        ("How much is left when {b} is removed from {a}?", "Find the difference between {a} and {b}."),
        _make_subtract,
    ),
    Family(
        "reverse_words",
        (
            "Reverse the order of these words.",
            "Write the words below in reverse order.",
            "Put these words in the opposite order.",
            "List the words backwards, last word first.",
        ),
        (
            "Starting from the final word, rewrite the list in the other direction.",
            "Flip the sequence of the given words.",
        ),
        _make_reverse,
    ),
    Family(
        "sort_words",
        (
            "Sort these words alphabetically.",
            "Arrange the words below in alphabetical order.",
            "Put these words in A to Z order.",
            "Order the following words alphabetically.",
        ),
        (
            "Rearrange the list so it reads like a dictionary.",
            "Which order would these words have in an index? Rewrite them so.",
        ),
        _make_sort,
    ),
    Family(
        "count_words",
        (
            "How many words are in this sentence?",
            "Count the words in the sentence below.",
            "Tell me the number of words in the text.",
            "Give the word count of this sentence.",
        ),
        (
            "What is the length of this sentence, measured in words?",
            "Determine how many separate words the text contains.",
        ),
        _make_count_words,
    ),
    Family(
        "count_letter",
        (
            "How many times does the letter '{letter}' appear in '{text}'?",
            "Count the letter '{letter}' in '{text}'.",
            "How often does '{letter}' occur in '{text}'?",
            "Find the number of '{letter}' characters in '{text}'.",
        ),
        (
            "In the text '{text}', tally every '{letter}'.",
            "Report the frequency of the character '{letter}' within '{text}'.",
        ),
        _make_count_letter,
    ),
    Family(
        "convert_units",
        (
            "Convert {v} {src} to {dst}.",
            "How many {dst} are in {v} {src}?",
            "Express {v} {src} in {dst}.",
            "What is {v} {src} in {dst}?",
        ),
        ("I have {v} {src}; what is that measured in {dst}?", "Change {v} {src} into {dst}, please."),
        _make_convert,
    ),
    Family(
        "format_date",
        (
            "Write this date in words.",
            "Convert the date to a long format.",
            "Spell out the date below with the month name.",
            "Rewrite the date in a readable form.",
        ),
        ("Turn this numeric date into one a person would say.", "Say this date using the name of its month."),
        _make_date,
    ),
    Family(
        "context_qa",
        (
            "Read the text and answer: {q}",
            "Using the passage, answer this question: {q}",
            "Answer based on the input. {q}",
            "{q} Use the information given.",
        ),
        ("Consult the paragraph and reply to the following. {q}", "According to the description provided, {q}"),
        _make_qa,
    ),
    Family(
        "describe",
        (
            "Write one sentence about a {c} {a} that likes {what}.",
            "Describe a {c} {a} that likes {what}.",
            "Tell a tiny story about a {c} {a} that likes {what}.",
            "Compose a short line about a {c} {a} that likes {what}.",
        ),
        (
            "Give me a single-sentence tale featuring a {a} that is {c} and likes {what}.",
            "I need a brief depiction of a {c} {a}; it likes {what}.",
        ),
        _make_describe,
    ),
    Family(
        "max_number",
        (
            "Which number is the largest?",
            "Find the biggest number in the list.",
            "What is the maximum of these numbers?",
            "Pick the largest value below.",
        ),
        (
            "Out of the values provided, report the one of greatest magnitude.",
            "Identify the top value in this collection.",
        ),
        _make_max,
    ),
)


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
