"""The demo zoo's synthetic text tasks and their character vocabulary.

Every item is a prompt and a gold answer that ends with '.', e.g.
``add:12+34=`` -> ``46.``. Items are drawn from explicit seeded generators.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
CHARS = string.digits + LETTERS + ":+=."
PAD, UNK = "<pad>", "<unk>"
VOCAB = [PAD, UNK, *CHARS]


@dataclass(frozen=True)
class Item:
    prompt: str
    answer: str

    def to_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer}


def _letters(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def add(rng: random.Random) -> Item:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Item(f"add:{a}+{b}=", f"{a + b}.")


def rev(rng: random.Random) -> Item:
    s = _letters(rng)
    return Item(f"rev:{s}=", f"{s[::-1]}.")


def sort(rng: random.Random) -> Item:
    s = _letters(rng)
    return Item(f"sort:{s}=", f"{''.join(sorted(s))}.")


def cp(rng: random.Random) -> Item:
    s = _letters(rng)
    return Item(f"cp:{s}=", f"{s}.")


GENERATORS: dict[str, Callable[[random.Random], Item]] = {"add": add, "rev": rev, "sort": sort, "cp": cp}


def key(item: Item) -> str:
    """What makes two items the same problem (the operands, whatever the task)."""
    return item.prompt.split(":", 1)[1]


def held_out(task: str, n: int, seed: int, exclude: set[str]) -> list[Item]:
    """``n`` distinct items of ``task`` whose keys are not in ``exclude`` (which grows)."""
    rng = random.Random(f"{seed}:{task}:held-out")
    out: list[Item] = []
    while len(out) < n:
        item = GENERATORS[task](rng)
        if key(item) not in exclude:
            exclude.add(key(item))
            out.append(item)
    return out


class TrainSampler:
    """Seeded training items that never repeat a held-out problem."""

    def __init__(self, seed: int, exclude: set[str]):
        self.rng = random.Random(f"{seed}:train")
        self.exclude = exclude

    def item(self, task: str) -> Item:
        while True:
            item = GENERATORS[task](self.rng)
            if key(item) not in self.exclude:
                return item

    def batch(self, mix: dict[str, float], size: int) -> list[Item]:
        tasks = self.rng.choices(list(mix), weights=list(mix.values()), k=size)
        return [self.item(t) for t in tasks]
