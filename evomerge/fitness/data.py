"""Task data on disk: JSONL files of ``{"prompt", "answer"}`` items."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.fitness.tasks import Item


def write_jsonl(path: Path, items: Iterable[Item]) -> None:
    with path.open("w") as fh:
        for item in items:
            fh.write(json.dumps(item.to_json()) + "\n")


def read_jsonl(path: Path) -> list[Item]:
    """Items of a JSONL file; every line needs string fields ``prompt`` and ``answer``."""
    items: list[Item] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise EvomergeError(f"{path}: cannot read task data: {err.strerror or err}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(Item(str(row["prompt"]), str(row["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvomergeError(f"{path}:{n}: expected a JSON object with 'prompt' and 'answer'") from None
    if not items:
        raise EvomergeError(f"{path}: no items")
    return items
