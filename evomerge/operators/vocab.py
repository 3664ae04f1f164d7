"""Merging models whose vocabularies differ, as mergekit 0.1.5 does.

With a tokenizer source (``tokenizer_source:``, or ``tokenizer: {source: ...}``) the
output vocabulary is ``base`` (the base model's tokenizer), a model's tokenizer, or
``union`` (the base's tokenizer plus every token another model has, in model order,
then every added token). Each source's vocabulary tensors (embeddings and output head:
tensors outside the layers whose rows number the model's ``vocab_size``) are permuted
to the output's token order before the merge. A token a model lacks takes a default
row, the same for every model: the row of the only model that has it; else the base
model's row; else the mean of the rows of the models that have it; zero when none has
it. ``tokenizer.tokens`` overrides the default per token (a model's row for the token,
a model's row for another token, or zero); with ``force`` every model takes it, even
one that has the token. ``pad_to_multiple_of`` rounds the rows up, the extra rows the
mean of the real ones.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import MergeError, RecipeError

UNION, BASE = "union", "base"


@dataclass(frozen=True)
class TokenSource:
    """A default row: the mean of ``rows`` [(model, source row)], zero when empty."""

    rows: tuple[tuple[str, int], ...]
    force: bool = False


@dataclass(frozen=True)
class VocabPlan:
    size: int  # output rows
    real: int  # rows that are tokens (the rest pad to a multiple)
    index: dict[str, Tensor]  # model -> source row of each output token row (-1: lacks it)
    defaults: dict[int, TokenSource] = field(default_factory=dict)  # output row -> its default row
    tokenizer: Any = None  # the output tokenizer
    source: str = BASE

    def align(self, model: str, t: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        """``t`` (model ``model``'s tensor) with rows in output order; ``inputs`` are every
        model's tensor of the same name (the default rows come from them)."""
        index = self.index[model].to(t.device)
        out = t.new_zeros((self.size, *t.shape[1:]))
        present = index >= 0
        out[: self.real][present] = t[index[present]]
        for row, src in self.defaults.items():
            if src.force or not bool(present[row]):
                out[row] = self._default(src, inputs, t)
        if self.size > self.real:
            out[self.real :] = out[: self.real].to(torch.float32).mean(dim=0).to(t.dtype)
        return out

    @staticmethod
    def _default(src: TokenSource, inputs: dict[str, Tensor], like: Tensor) -> Tensor:
        rows = [inputs[m][r].to(torch.float32) for m, r in src.rows if m in inputs]
        if not rows:
            return like.new_zeros(like.shape[1:])
        return (torch.stack(rows).sum(dim=0) / len(rows)).to(like.dtype)


class _Positional:
    """A model without tokenizer files: token ``i`` is row ``i`` (so models without
    tokenizers align by position, the output keeping the chosen model's rows)."""

    def __init__(self, size: int):
        self.size = size
        self.added_tokens_decoder: dict[int, Any] = {}

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(self.size)}

    def save_pretrained(self, path: str) -> None:
        pass


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        return None


def _vocab_size(path: Path, tok) -> int:
    try:
        size = json.loads((path / "config.json").read_text()).get("vocab_size")
    except (OSError, json.JSONDecodeError):
        size = None
    if not size and tok is None:
        raise MergeError(f"{path}: no tokenizer and no vocab_size in config.json")
    return int(size) if size else len(tok.get_vocab())


def _union(base_name: str, toks: dict[str, Any], sizes: dict[str, int]):
    """The base tokenizer plus every other token, regular tokens first, then added ones
    (an added token that two models define differently is refused)."""
    from transformers import AutoTokenizer

    added: dict[str, tuple[str, Any]] = {}
    regular: dict[str, None] = {}
    for name, tok in toks.items():
        specials = tok.added_tokens_decoder
        for idx, info in specials.items():
            if idx >= sizes[name]:
                continue
            if info.content in added and _settings(added[info.content][1]) != _settings(info):
                raise MergeError(
                    f"tokenizer union: token {info.content!r} is added by '{added[info.content][0]}' and "
                    f"'{name}' with different settings ({_settings(added[info.content][1])} vs {_settings(info)})"
                )
            added.setdefault(info.content, (name, info))
        contents = {i.content for i in specials.values()}
        for token, idx in tok.get_vocab().items():
            if idx < sizes[name] and token not in contents:
                regular.setdefault(token, None)
    with tempfile.TemporaryDirectory() as tmp:  # a copy: never the base's own object
        toks[base_name].save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
    have = out.get_vocab()
    new = [t for t in regular if t not in have]
    if new:
        out.add_tokens(new)
    for _name, info in added.values():
        out.add_tokens([info], special_tokens=info.special)
    return out


def _settings(info) -> dict[str, bool]:
    return {k: bool(getattr(info, k)) for k in ("special", "normalized", "lstrip", "rstrip", "single_word")}


def _token_sources(cfg: dict[str, Any], names: list[str], toks, vocab_out: dict[str, int], index) -> dict:
    out: dict[int, TokenSource] = {}
    for token, spec in cfg.items():
        if token not in vocab_out:
            raise RecipeError(f"tokenizer.tokens: {token!r} is not in the output vocabulary")
        row = vocab_out[token]
        src = spec.get("source") if isinstance(spec, dict) else None
        force = bool(spec.get("force", False)) if isinstance(spec, dict) else False
        if src is None:
            continue
        if isinstance(src, str):
            if src not in index:
                raise RecipeError(f"tokenizer.tokens: {token!r}: '{src}' is not a model of this merge")
            r = int(index[src][row])
            if r < 0:
                raise RecipeError(f"tokenizer.tokens: {token!r} is not in the vocabulary of '{src}'")
            out[row] = TokenSource(((src, r),), force)
        elif src.get("kind") == "zero":
            out[row] = TokenSource((), force)
        elif src.get("kind") == "model_token":
            model = src.get("model")
            if model not in toks:
                raise RecipeError(f"tokenizer.tokens: {token!r}: '{model}' is not a model of this merge")
            r = src.get("token_id")
            if r is None:
                r = toks[model].get_vocab().get(src.get("token"))
                if r is None:
                    raise RecipeError(f"tokenizer.tokens: {token!r}: {src.get('token')!r} is not a token of '{model}'")
            out[row] = TokenSource(((model, int(r)),), force)
        else:
            raise RecipeError(f"tokenizer.tokens: {token!r}: unknown source {src!r}")
    return out


def build_vocab_plan(
    source: str,
    base: str | None,
    paths: dict[str, Path],
    tokens: dict[str, Any] | None = None,
    pad_to: int | None = None,
) -> VocabPlan:
    """The output vocabulary of a merge over ``paths`` (model name -> directory, in the
    recipe's order). Cached: a search plans the same vocabulary for every candidate."""
    return _cached_plan((source, base, tuple((n, str(p)) for n, p in paths.items()), json.dumps(tokens), pad_to))


@functools.lru_cache(maxsize=8)
def _cached_plan(key) -> VocabPlan:
    source, base, items, tokens_json, pad_to = key
    paths = {n: Path(p) for n, p in items}
    names = list(paths)
    base_name = base if base is not None else names[0]
    toks: dict[str, Any] = {}
    for name in [base_name, *[n for n in names if n != base_name]]:
        tok = _tokenizer(paths[name])
        if tok is not None:
            toks[name] = tok
    if base_name not in toks:  # no tokenizer files at all: rows align by position
        toks = {n: _Positional(_vocab_size(paths[n], None)) for n in names}
    sizes = {n: _vocab_size(paths[n], toks.get(n, toks[base_name])) for n in names}
    if source == UNION and isinstance(toks[base_name], _Positional):
        out_tok = max(toks.values(), key=lambda t: t.size)
    elif source == UNION:
        out_tok = _union(base_name, toks, sizes)
    elif source == BASE:
        out_tok = toks[base_name]
    else:
        if source not in toks:
            raise MergeError(f"tokenizer_source '{source}' has no tokenizer")
        out_tok = toks[source]
    vocab_out = out_tok.get_vocab()
    real = len(vocab_out)
    size = -(-real // pad_to) * pad_to if pad_to else real
    index: dict[str, Tensor] = {}
    for name in names:
        vocab = toks.get(name, toks[base_name]).get_vocab()
        idx = torch.full((real,), -1, dtype=torch.long)
        for token, row in vocab_out.items():
            r = vocab.get(token)
            if r is not None and r < sizes[name] and row < real:
                idx[row] = r
        index[name] = idx
    defaults: dict[int, TokenSource] = {}
    have = torch.stack([index[n] >= 0 for n in names])  # models x rows
    for row in torch.nonzero(~have.all(dim=0)).flatten().tolist():
        holders = [n for n, h in zip(names, have[:, row].tolist()) if h]
        if len(holders) == 1:
            defaults[row] = TokenSource(((holders[0], int(index[holders[0]][row])),))
        elif base is not None and base in holders:
            defaults[row] = TokenSource(((base, int(index[base][row])),))
        else:
            defaults[row] = TokenSource(tuple((n, int(index[n][row])) for n in holders))
    defaults |= _token_sources(json.loads(tokens_json) or {}, names, toks, vocab_out, index)
    return VocabPlan(size, real, index, defaults, out_tok, source)
