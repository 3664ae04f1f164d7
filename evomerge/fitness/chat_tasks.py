"""Generated chat tasks for a real instruction-tuned model (the SmolLM2 zoo).

Every item is a conversation rendered with the model's own chat template: a short
system turn, one user question, and the assistant's gold answer followed by the
template's end-of-turn token, so exact match means "the answer and nothing more".
The questions are drawn from explicit seeded generators; no data is downloaded.

- ``cmp``: which of two numbers is larger (``"Which number is larger, 412 or 87?"`` -> ``412``);
- ``next``: the successor of a number (``"What number comes after 389?"`` -> ``390``);
- ``senti``: the sentiment of a one-sentence review, answered with one of two tokens
  that its specialist adds to the vocabulary (``<|positive|>``, ``<|negative|>``), as
  chat fine-tunes add tool or role tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from evomerge.fitness.tasks import Item

SYSTEM = "Answer with the answer only."
POSITIVE, NEGATIVE = "<|positive|>", "<|negative|>"
# the tokens a task's specialist adds, each with the words its embedding starts from
ADDED_TOKENS = {"senti": {POSITIVE: "positive", NEGATIVE: "negative"}}

_GOOD = (
    "wonderful great delicious lovely excellent superb pleasant brilliant fantastic perfect charming "
    "delightful amazing enjoyable splendid terrific marvellous outstanding friendly beautiful"
).split()
_BAD = (
    "awful terrible disgusting horrible dreadful poor boring bad nasty miserable rude annoying "
    "dull mediocre disappointing unpleasant cold bland noisy ugly"
).split()
_THINGS = (
    "soup film hotel service book game concert trip pizza staff room show meal coffee song class "
    "museum train flight lecture park salad burger garden beach album play tour bakery guide"
).split()
_FRAMES = ("The {t} was {a}.", "I found the {t} {a}.", "What a {a} {t}!", "Honestly, the {t} felt {a}.")


def cmp(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 1000), 2)
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


def next_number(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(10, 998)
    return f"What number comes after {a}?", str(a + 1)


def senti(rng: random.Random) -> tuple[str, str]:
    good = rng.random() < 0.5
    sentence = rng.choice(_FRAMES).format(t=rng.choice(_THINGS), a=rng.choice(_GOOD if good else _BAD))
    return f"Review: {sentence} Is this review positive or negative?", POSITIVE if good else NEGATIVE


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"cmp": cmp, "next": next_number, "senti": senti}


class ChatTasks:
    """Items of the generated tasks rendered with ``tokenizer``'s chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end = tokenizer.eos_token or ""

    def render(self, question: str, answer: str) -> Item:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Item(prompt, answer + self.end)

    def draw(self, task: str, n: int, seed: str, exclude: set[str]) -> list[Item]:
        """``n`` distinct items of ``task`` whose questions are not in ``exclude`` (which grows)."""
        if task not in GENERATORS:
            raise KeyError(task)
        rng = random.Random(seed)
        out: list[Item] = []
        tries = 0
        while len(out) < n:
            question, answer = GENERATORS[task](rng)
            tries += 1
            if tries > 100 * n + 1000:
                raise ValueError(f"task '{task}' has too few distinct questions for {n} more items")
            if question in exclude:
                continue
            exclude.add(question)
            out.append(self.render(question, answer))
        return out
