"""Router initialisation for a mixture of experts, as mergekit-moe 0.1.5 computes it.

For expert e and layer l the router row is a unit vector g[l, e] (shape: layers x
experts x hidden). From prompts: v(P) is the sum over prompts and positions of the
token embeddings, normalised (``cheap_embed``, the same for every layer), or the
mean over prompts of the base's hidden state entering layer l at the last position
(``hidden``; ``hidden_avg`` averages the positions, padding included); then
g = (v(positive) - v(negative)) / |v(positive) - v(negative)|. Without prompts,
g ~ N(0, 1) (``random``) or U(-1/sqrt(hidden), 1/sqrt(hidden)) (``uniform_random``),
drawn from the caller's seeded generator.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import ModelError
from evomerge.operators.moe_config import MoEConfig


def gate_vectors(
    cfg: MoEConfig,
    base_dir: Path,
    embed: Tensor,
    layers: int,
    gen: torch.Generator,
    device: str = "cpu",
    memo: dict[Any, Any] | None = None,
) -> Tensor:
    """The routers' weights, layers x gated experts (:meth:`MoEConfig.gated`) x hidden (float32 for the prompt-free
    modes and ``cheap_embed``, bfloat16 for the hidden-state modes, as mergekit), each
    expert's row times its ``gate_scale``. ``memo`` keeps the tokenizer, the base model
    and each prompt set's rows between calls (a search worker's candidates share them)."""
    shape = (layers, len(cfg.gated()), embed.shape[1])
    if cfg.gate_mode == "random":
        return _scaled(cfg, torch.randn(shape, generator=gen))
    if cfg.gate_mode == "uniform_random":
        bound = math.sqrt(1.0 / shape[2])  # nn.Linear's default initialisation range
        return _scaled(cfg, torch.rand(shape, generator=gen) * 2 * bound - bound)
    memo = {} if memo is None else memo
    if "tokenizer" not in memo:
        memo["tokenizer"] = _tokenizer(base_dir)
    tokenizer = memo["tokenizer"]
    if cfg.gate_mode == "cheap_embed":

        def vec(prompts: list[str]) -> Tensor:
            return _cheap_embedding(embed, _tokenize(tokenizer, prompts)).repeat(layers, 1)
    else:
        if "model" not in memo:
            memo["model"] = _load_model(base_dir, device)

        def vec(prompts: list[str]) -> Tensor:
            return _hidden_states(memo["model"], _tokenize(tokenizer, prompts), average=cfg.gate_mode == "hidden_avg")

    rows = []
    for expert in cfg.gated():
        key = (cfg.gate_mode, *expert.prompts())
        if key not in memo:
            v = vec(expert.positive_prompts or [])
            if expert.negative_prompts:
                v = v - vec(expert.negative_prompts)
            memo[key] = (v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)).cpu()
        rows.append(memo[key])
    return _scaled(cfg, torch.stack(rows, dim=0).permute(1, 0, 2))


def _scaled(cfg: MoEConfig, gates: Tensor) -> Tensor:
    """Each expert's router rows times its ``gate_scale`` (where set)."""
    if all(e.gate_scale is None for e in cfg.gated()):
        return gates
    scale = torch.tensor([1.0 if e.gate_scale is None else e.gate_scale for e in cfg.gated()])
    return gates * scale.to(gates.dtype)[None, :, None]


def _tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except (OSError, ValueError) as err:
        raise ModelError(f"{base_dir}: its tokenizer cannot be loaded for the gate prompts: {err}") from None
    # prompts are padded on the left with the BOS token (else EOS), so that the last
    # position is every prompt's last token
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise ModelError(f"{base_dir}: the base model's tokenizer has no BOS or EOS token to pad the gate prompts with")
    return tok


def _tokenize(tok: Any, prompts: list[str]) -> dict[str, Tensor]:
    bos = tok.bos_token or ""
    enc = tok([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _cheap_embedding(embed: Tensor, enc: dict[str, Tensor]) -> Tensor:
    """Sum of the prompts' token embeddings over positions and prompts, normalised (1 x hidden)."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if int(ids.max()) >= embed.shape[0]:
        raise ModelError(f"the tokenizer gives token id {int(ids.max())}, past the embedding's {embed.shape[0]} rows")
    h = embed.float()[ids]  # the rows a one-hot product picks, exactly
    summed = (h * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _load_model(base_dir: Path, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    except (OSError, ValueError) as err:
        raise ModelError(f"{base_dir}: the base model cannot be loaded for the hidden-state gates: {err}") from None
    return model.to(device).eval()  # type: ignore[arg-type]


def _hidden_states(model: Any, enc: dict[str, Tensor], average: bool) -> Tensor:
    """The mean over prompts of each layer's input hidden state (layers x hidden): at
    the last position, or averaged over the positions."""
    with torch.no_grad():
        out = model(**{k: v.to(model.device) for k, v in enc.items()}, output_hidden_states=True, return_dict=True)
    hs = torch.stack(out.hidden_states[:-1])  # layers x batch x positions x hidden: each layer's input
    hs = hs.sum(dim=2) / hs.shape[2] if average else hs[:, :, -1, :]
    return hs.sum(dim=1) / hs.shape[1]
