"""The text the tiny model's tokenizer is trained on: shipped passages plus sentences built
deterministically from shipped word lists (nothing is downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"


def corpus_lines(seed: int = 0) -> list[str]:
    """The tokenizer's training text: the shipped passages plus sentences generated from the
    shipped word lists by a seeded generator."""
    words = _read_word_lists()
    rng = random.Random(seed)
    lines = (DATA_DIR / "passages.txt").read_text(encoding="utf-8").splitlines()
    for _ in range(1500):
        paragraph = " ".join(_sentence(rng, words) for _ in range(rng.randint(2, 6)))
        lines.append(paragraph)
    return lines


def _read_word_lists() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in (DATA_DIR / "words.txt").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            current.extend(line.split())
    return sections


def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _sentence(rng: random.Random, w: dict[str, list[str]]) -> str:
    verbs = w["verbs"]
    k = rng.randrange(len(verbs) // 2)
    base, past = verbs[2 * k], verbs[2 * k + 1]
    noun, noun2, noun3 = (rng.choice(w["nouns"]) for _ in range(3))
    adj, adj2 = rng.choice(w["adjectives"]), rng.choice(w["adjectives"])
    adv, prep = rng.choice(w["adverbs"]), rng.choice(w["prepositions"])
    name, name2, place = rng.choice(w["names"]), rng.choice(w["names"]), rng.choice(w["places"])
    number = rng.choice(
        [
            str(rng.randint(2, 12)),
            str(rng.randint(13, 999)),
            f"{rng.randint(1, 99)}.{rng.randint(0, 9)}",
        ]
    )
    year = str(rng.randint(1850, 2030))
    forms = [
        f"The {adj} {noun} {past} the {noun2} {prep} the {noun3}.",
        f"{name} {past} {adv} {prep} {place}.",
        f"Why did the {noun} {base} the {adj} {noun2}?",
        f"In {year}, {name} {past} {number} {_plural(noun)} near {place}.",
        f'"Can you {base} the {noun}?" asked {name}. "Not {adv}," said {name2}.',
        f"{name} and {name2} {past} a {adj} {noun} {prep} the {adj2} {noun2}.",
        f"Every {noun} in {place} is {adj}, but the {noun2} is {adj2}.",
        f"If you {base} the {noun}, the {noun2} will be {adj}.",
        f"There were {number} {adj} {_plural(noun)} {prep} the {noun2}.",
        f"{name}'s {noun} {past} {adv}; nobody knew why.",
        f"- {adj.capitalize()} {_plural(noun)}: {number}",
        f"Please {base} the {adj} {noun} before {rng.randint(1, 12)}:{rng.randint(0, 59):02d}.",
    ]
    return rng.choice(forms)
