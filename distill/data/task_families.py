"""The embedded suite's task families: arithmetic, string and list tasks, unit conversion, dates, facts about
people, descriptions. Each family has training phrasings, held-out phrasings (the `shift_wording` benchmark), and a
maker that draws one example (with `long=True` for the `shift_long` benchmark) with 2-3 paraphrased answers."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from distill.data.records import Record

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
