"""Training the zoo's models on the CPU: loss on answer tokens only, AdamW with
linear warm-up and cosine decay."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from evomerge.fitness.tasks import Item, TrainSampler
from evomerge.fitness.tokenizer import CHAR_IDS, PAD, encode

IGNORE = -100


def collate(items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (answer tokens only)."""
    seqs = [(encode(i.prompt), encode(i.answer)) for i in items]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(items), width), CHAR_IDS[PAD], dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, (p, a) in enumerate(seqs):
        n = len(p) + len(a)
        ids[row, :n] = torch.tensor(p + a)
        mask[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(a)
    return ids, mask, labels


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class Replay:
    """Batches drawn in advance from a sampler, handed out in order: trainings that would
    have drawn them one after another from one sampler can then run side by side (in
    other processes) on exactly the same data."""

    def __init__(self, batches: list[list[Item]]):
        self._batches = iter(batches)

    def batch(self, mix: dict[str, float], size: int) -> list[Item]:
        return next(self._batches)


def train(
    model,
    sampler: TrainSampler | Replay,
    mix: dict[str, float],
    *,
    steps: int,
    lr: float,
    batch: int,
    warmup_frac: float = 0.05,
    weight_decay: float = 0.0,
) -> float:
    """Train ``model`` in place; return the mean loss of the last 10% of steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(steps * warmup_frac))
    tail: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        ids, mask, labels = collate(sampler.batch(mix, batch))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps * 0.9:
            tail.append(loss.item())
    model.eval()
    return sum(tail) / max(1, len(tail))
