"""The native batched scorer: exact match of the greedy continuation in one forward pass.

For a prompt p and gold answer a, the greedy continuation equals a exactly when,
teacher-forced on p + a, the argmax at every answer position is the answer token
(greedy decoding would emit a[0], then, given it, a[1], and so on). One padded
forward pass per batch therefore scores what ``generate()`` would, without the
decoding loop. Items are encoded once and reused for every candidate model.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.fitness.data import read_jsonl
from evomerge.fitness.tasks import Item


@dataclass(frozen=True)
class Encoded:
    """Right-padded inputs (prompt + answer minus its last token) and answer targets."""

    ids: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor  # answer token at each answer position, -1 elsewhere

    def __len__(self) -> int:
        return self.ids.shape[0]

    def subset(self, rows: Sequence[int]) -> Encoded:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        ids, mask, target = self.ids[index], self.mask[index], self.target[index]
        width = int(mask.sum(dim=1).max()) if len(index) else 1
        return Encoded(ids[:, :width], mask[:, :width], target[:, :width])


def encode(tokenizer, items: Sequence[Item]) -> Encoded:
    """Encode items with ``tokenizer`` (no special tokens, as lm-eval's loglikelihood does)."""
    prompts = tokenizer([i.prompt for i in items], add_special_tokens=False)["input_ids"]
    answers = tokenizer([i.answer for i in items], add_special_tokens=False)["input_ids"]
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs) - 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    target = torch.full((len(items), width), -1, dtype=torch.long)
    for row, (p, s) in enumerate(zip(prompts, seqs)):
        n = len(s) - 1
        ids[row, :n] = torch.tensor(s[:-1])
        mask[row, :n] = 1
        target[row, len(p) - 1 : n] = torch.tensor(s[len(p) :])
    return Encoded(ids, mask, target)


def shared_prefix(batch: Encoded) -> int:
    """Tokens that every item starts with, up to (not including) its first scored position.

    A task's prompts usually share a head (an instruction, few-shot examples, a
    ``task:`` tag); its hidden states are the same for every item under causal
    attention, so they are computed once.
    """
    if len(batch) == 0:
        return 0
    same = (batch.ids == batch.ids[0]).all(dim=0).long().cumprod(dim=0)
    first_answer = int((batch.target >= 0).long().argmax(dim=1).min())
    return min(int(same.sum()), first_answer)


def _prefix_cache(body, ids: torch.Tensor, keyword: str):
    """The KV cache of ``ids`` (one row), or None when the model keeps none.

    A layer stack turns its cache off (one layer may run twice and would clash in
    a per-layer cache slot); such a model is scored without a shared prefix.
    """
    if len(ids) == 0 or not getattr(body.config, "use_cache", True):
        return None
    out = body(input_ids=ids[None], use_cache=True)
    cache = getattr(out, keyword)
    return cache if hasattr(cache, "batch_repeat_interleave") else None


def _cache_keyword(body) -> str:
    """The name of the KV-cache argument and output: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


@torch.inference_mode()
def score(model, batch: Encoded, *, batch_size: int = 160) -> torch.Tensor:
    """Exact match of the greedy continuation for each encoded item (bool, on the CPU).

    Sequences are right-padded, so under causal attention no real token ever sees a
    pad: the forward pass needs no attention mask. Items go through in batches of
    similar length (less padding), the prefix every item shares runs once (its KV
    cache is repeated over each batch), and the output head runs only at answer
    positions.
    """
    device = next(model.parameters()).device
    body, head = model.get_decoder(), model.get_output_embeddings()
    keyword = _cache_keyword(body)
    n_prefix = shared_prefix(batch)
    prefix = _prefix_cache(body, batch.ids[0, :n_prefix].to(device), keyword)
    if prefix is None:
        n_prefix = 0
    lengths = batch.mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    hits = torch.zeros(len(batch), dtype=torch.bool)
    for start in range(0, len(batch), batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        ids = batch.ids[rows, n_prefix:width].to(device)
        target = batch.target[rows, n_prefix:width].to(device)
        if prefix is None:
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state
        else:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(rows))
            hidden = body(input_ids=ids, use_cache=True, **{keyword: cache}).last_hidden_state
        answer = target >= 0
        hit = torch.ones_like(target, dtype=torch.bool)
        hit[answer] = head(hidden[answer]).argmax(-1) == target[answer]
        hits[rows] = hit.all(dim=1).cpu()
    return hits


def accuracy_table(model, tokenizer, files: dict[str, dict[str, Path]]) -> dict[str, dict[str, float]]:
    """Native accuracy of ``model`` on every task and split given as JSONL files."""
    out: dict[str, dict[str, float]] = {}
    for task, splits in files.items():
        out[task] = {}
        for split, path in splits.items():
            hits = score(model, encode(tokenizer, read_jsonl(path)))
            out[task][split] = round(float(hits.float().mean()), 4)
    return out
