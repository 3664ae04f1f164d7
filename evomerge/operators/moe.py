"""Mixture-of-experts merges (mergekit-moe): dense Llama or Mistral fine-tunes become
the experts of a Mixtral model (with a shared expert, of a Qwen2-MoE model: see
:mod:`evomerge.operators.moe_qwen`).

The output keeps the base's embeddings, attention and norms; layer l's expert e is
expert e's MLP at layer l (``gate_proj``/``up_proj`` fused into ``gate_up_proj``,
``down_proj`` as is, each stacked over the experts in transformers' Mixtral layout),
plus N(0, noise_scale^2) noise where an expert asks for it and ``residual_scale`` on
its ``down_proj``; the routers come from :mod:`evomerge.operators.moe_gates`. One
seeded generator draws the random gates first, then the noise layer by layer, expert
by expert, in mergekit's order (gate, down, up): ``--random-seed`` gives mergekit the
same numbers.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import ModelError
from evomerge.operators.checkpoint import Checkpoint, open_checkpoint
from evomerge.operators.engine import DEFAULT_SHARD_BYTES, MergeResult, pick_device, resolve_model_path
from evomerge.operators.moe_config import MoEConfig
from evomerge.operators.moe_gates import gate_vectors
from evomerge.operators.moe_qwen import qwen_config, qwen_entries, qwen_kept, qwen_tensors
from evomerge.operators.moe_sources import EMBED, MLP, MoESources, expert_part, router_dtype
from evomerge.operators.outputs import TOKENIZER_FILES, card_sources, license_of, render_card, shared_license
from evomerge.operators.recipe import DTYPES
from evomerge.operators.writer import Entry, ShardWriter, atomic_directory, write_text

DENSE_TYPES = ("llama", "mistral")
QWEN_TYPES = ("llama", "mistral", "qwen2")  # what mergekit-moe makes a Qwen2-MoE of
CONFIG_FILE = "mergekit_moe_config.yml"


def open_moe_sources(
    cfg: MoEConfig, resolver: Callable[[str], Path] = resolve_model_path, allow_pickle: bool = False
) -> MoESources:
    """Open and check the models: one architecture (Llama or Mistral; Qwen2 too for a
    Qwen2-MoE) and one MLP shape, every tensor of the base with a place in the output.
    One line on a misfit."""
    opened = {name: open_checkpoint(resolver(name), allow_pickle=allow_pickle) for name in cfg.models()}
    shared = [opened[e.source_model] for e in cfg.shared_experts or []]
    src = MoESources(opened[cfg.base_model], [opened[e.source_model] for e in cfg.experts], shared)
    src.arch = output_arch(cfg, {name: ck.config.get("model_type") for name, ck in opened.items()})
    _check(cfg, src)
    return src


def output_arch(cfg: MoEConfig, types: dict[str, Any]) -> str:
    """The output's model_type, as mergekit-moe 0.1.5 picks it: a Mixtral without shared
    experts (Llama or Mistral sources), a Qwen2-MoE with one whose gate has prompts (or
    random gates; Llama, Mistral or Qwen2 sources). mergekit-moe's DeepSeek-MoE (a shared
    expert with no gate) is not written."""
    for name, kind in types.items():
        if kind not in QWEN_TYPES:
            raise ModelError(f"{name}: model_type '{kind}' cannot become part of a Mixtral or Qwen2-MoE")
    if len(set(types.values())) > 1:
        listed = ", ".join(f"{n}: {t}" for n, t in types.items())
        raise ModelError(f"the models mix architectures ({listed}); a mixture of experts needs one")
    kind, wanted = next(iter(types.values())), (cfg.architecture or "").lower()
    if not cfg.shared_experts:
        if wanted and "qwen moe".startswith(wanted):
            raise ModelError("architecture: a Qwen2-MoE needs exactly one shared expert (shared_experts)")
        if kind not in DENSE_TYPES:
            raise ModelError(
                f"{cfg.base_model}: model_type '{kind}' cannot become part of a Mixtral (llama or mistral); "
                "with one shared expert it makes a Qwen2-MoE"
            )
        return "mixtral"
    if wanted and "mixtral".startswith(wanted):
        raise ModelError("shared_experts: a Mixtral has no shared expert (architecture: qwen writes a Qwen2-MoE)")
    shared = cfg.shared_experts[0]
    if kind in DENSE_TYPES and not wanted and not (shared.positive_prompts or shared.negative_prompts):
        raise ModelError(
            "shared_experts.0: a shared expert without prompts makes mergekit-moe write a DeepSeek-MoE, which "
            "evomerge does not; give it prompts or set architecture: qwen for a Qwen2-MoE"
        )
    return "qwen2_moe"


def _check(cfg: MoEConfig, src: MoESources) -> None:
    if not src.layers:
        raise ModelError(f"{cfg.base_model}: config.json gives no num_hidden_layers")
    placed = src.kept() if src.arch == "mixtral" else qwen_kept(src)
    # a Qwen2-MoE's q/k/v biases are zeros where the base has none
    missing = [n for n in placed if n not in src.base.tensors and not n.endswith("_proj.bias")]
    if missing:
        raise ModelError(f"{cfg.base_model}: has no tensor '{missing[0]}' for the mixture")
    known = set(placed)
    for name in src.base.tensors:
        if name not in known and ".mlp." not in name:
            raise ModelError(f"{cfg.base_model}: tensor '{name}' has no place in a {_NAMES[src.arch]}")
    for expert, ck in zip([*cfg.experts, *(cfg.shared_experts or [])], [*src.experts, *src.shared]):
        if ck.num_layers != src.layers:
            raise ModelError(f"{expert.source_model}: {ck.num_layers} layers, the base has {src.layers}")
        for i in range(src.layers):
            for part in MLP:
                name, ref = _mlp(i, part), src.experts[0].tensors.get(_mlp(i, part))
                info = ck.tensors.get(name)
                if info is None:
                    raise ModelError(f"{expert.source_model}: has no tensor '{name}'")
                if ref is not None and info.shape != ref.shape:
                    raise ModelError(
                        f"{expert.source_model}: tensor '{name}' is {list(info.shape)}, not {list(ref.shape)}"
                    )
    hidden = src.base.tensors[EMBED].shape[1]
    if src.experts[0].tensors[_mlp(0, "gate_proj")].shape[1] != hidden:
        raise ModelError(f"{cfg.experts[0].source_model}: its MLP is not of the base's hidden size {hidden}")


_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}


def _mlp(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.{part}.weight"


def out_dtype(cfg: MoEConfig, base: Checkpoint) -> torch.dtype | None:
    """``dtype``, else the base's config dtype, else None (each tensor keeps its own)."""
    name = cfg.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
    return DTYPES.get(str(name)) if name else None


def moe_entries(src: MoESources, dtype: torch.dtype | None) -> list[Entry]:
    """Every output tensor's name, shape and dtype, in the order :func:`moe_tensors` yields them."""
    if src.arch == "qwen2_moe":
        return qwen_entries(src, dtype)
    experts = len(src.experts)
    entries: list[Entry] = []
    for name in src.kept():
        info = src.base.tensors[name]
        entries.append((name, info.shape, dtype or info.dtype))
        if name.endswith("post_attention_layernorm.weight"):
            i = int(name.split(".")[2])
            gate = src.experts[0].tensors[_mlp(i, "gate_proj")]
            down = src.experts[0].tensors[_mlp(i, "down_proj")]
            hidden = gate.shape[1]
            entries += [
                (f"model.layers.{i}.mlp.gate.weight", (experts, hidden), router_dtype(src, dtype)),
                (
                    f"model.layers.{i}.mlp.experts.gate_up_proj",
                    (experts, 2 * gate.shape[0], hidden),
                    dtype or gate.dtype,
                ),
                (f"model.layers.{i}.mlp.experts.down_proj", (experts, *down.shape), dtype or down.dtype),
            ]
    return entries


def moe_tensors(
    cfg: MoEConfig, src: MoESources, routers: Tensor, gen: torch.Generator, dtype: torch.dtype | None
) -> Iterator[tuple[str, Tensor]]:
    """The mixture's tensors, one at a time, in :func:`moe_entries`' order. ``routers``
    is layers x gated experts x hidden; ``gen`` draws the experts' noise."""
    if src.arch == "qwen2_moe":
        yield from qwen_tensors(cfg, src, routers, gen, dtype)
        return

    def cast(t: Tensor) -> Tensor:
        return (t.to(dtype) if dtype is not None else t).contiguous()

    for name in src.kept():
        yield name, cast(src.base.get(name))
        if not name.endswith("post_attention_layernorm.weight"):
            continue
        i = int(name.split(".")[2])
        parts: dict[str, list[Tensor]] = {p: [] for p in MLP}
        for expert, ck in zip(cfg.experts, src.experts):
            for part in ("gate_proj", "down_proj", "up_proj"):  # mergekit's order of noise draws
                parts[part].append(expert_part(ck, expert, _mlp(i, part), gen, down=part == "down_proj"))
        yield f"model.layers.{i}.mlp.gate.weight", routers[i].to(router_dtype(src, dtype)).contiguous()
        gate_up, down = fuse_experts(parts["gate_proj"], parts["up_proj"], parts["down_proj"])
        yield f"model.layers.{i}.mlp.experts.gate_up_proj", cast(gate_up)
        yield f"model.layers.{i}.mlp.experts.down_proj", cast(down)


def fuse_experts(gates: list[Tensor], ups: list[Tensor], downs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """One layer's experts in transformers' Mixtral layout: ``gate_up_proj`` the experts'
    gate and up projections stacked on dim 0, gate then up on dim 1 (E x 2I x H);
    ``down_proj`` the down projections stacked (E x H x I)."""
    return torch.cat([torch.stack(gates), torch.stack(ups)], dim=1), torch.stack(downs)


def mixtral_config(cfg: MoEConfig, base_dir: Path, dtype: torch.dtype | None) -> dict[str, Any]:
    """The base's config as a Mixtral's (through Mistral's, sliding window off), with the experts' counts."""
    from transformers import AutoConfig, MistralConfig, MixtralConfig

    base = AutoConfig.from_pretrained(str(base_dir))
    if not isinstance(base, MistralConfig):
        mistral = MistralConfig(**base.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = base.max_position_embeddings
        base = mistral
    out = MixtralConfig(**base.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = len(cfg.experts)
    out.num_experts_per_tok = cfg.experts_per_token
    out.sliding_window = None
    if dtype is not None:
        out.dtype = dtype
    return out.to_diff_dict()  # what save_pretrained writes: the fields that differ from the defaults


def routers_for(
    cfg: MoEConfig, src: MoESources, gen: torch.Generator, device: str = "cpu", memo: dict[Any, Any] | None = None
) -> Tensor:
    """The routers of ``cfg`` over ``src``'s base (layers x experts x hidden)."""
    return gate_vectors(cfg, src.base.path, src.base.get(EMBED), src.layers, gen, device, memo)


def run_moe(
    cfg: MoEConfig,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    resolver: Callable[[str], Path] = resolve_model_path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    config_text: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    card_extra: str = "",
    before_commit: Callable[[Path], list[str]] | None = None,
) -> MergeResult:
    """Write the mixture ``cfg`` as a Hugging Face Mixtral directory at ``out_dir``
    (atomically: all of it or nothing), streamed tensor by tensor, with the base's
    tokenizer, a model card and the config (``config_text`` as the user wrote it).
    ``before_commit`` as :func:`evomerge.operators.engine.run_merge`'s."""
    start = time.perf_counter()
    dev = pick_device(device)
    src = open_moe_sources(cfg, resolver)
    dtype = out_dtype(cfg, src.base)
    gen = torch.Generator().manual_seed(seed)
    routers = routers_for(cfg, src, gen, str(dev))
    entries = moe_entries(src, dtype)
    with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, entries, max_shard_bytes)
        try:
            for n, (name, tensor) in enumerate(moe_tensors(cfg, src, routers, gen, dtype), 1):
                writer.write(name, tensor)
                if progress:
                    progress(n, len(entries))
            files = writer.finish()
        finally:
            writer.abort()
        files += _write_files(cfg, src, tmp, dtype, config_text or cfg.to_yaml(), card_extra)
        if before_commit is not None:
            files += before_commit(tmp)
    nbytes = sum(e[2].itemsize * math.prod(e[1]) for e in entries)
    return MergeResult(Path(out_dir), len(entries), nbytes, time.perf_counter() - start, sorted(files))


def _write_files(
    cfg: MoEConfig, src: MoESources, out: Path, dtype: torch.dtype | None, config_text: str, extra: str
) -> list[str]:
    written = ["config.json", "README.md", CONFIG_FILE]
    if src.arch == "qwen2_moe":
        config = qwen_config(cfg, src.base.path, dtype)
    else:
        config = mixtral_config(cfg, src.base.path, dtype)
    write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    for name in [*TOKENIZER_FILES, "generation_config.json"]:
        if (src.base.path / name).is_file():
            shutil.copyfile(src.base.path / name, out / name)
            written.append(name)
    write_text(out / "README.md", moe_card(cfg, src, config_text, extra))
    write_text(out / CONFIG_FILE, config_text)
    return written


def moe_card(cfg: MoEConfig, src: MoESources, config_text: str, extra: str = "") -> str:
    """The mixture's README.md: front matter, the base and experts, the licence, the config."""
    everyone = zip([*cfg.experts, *(cfg.shared_experts or [])], [*src.experts, *src.shared])
    paths = {cfg.base_model: src.base.path} | {e.source_model: ck.path for e, ck in everyone}
    sources = cfg.models()
    lic, why = shared_license({name: license_of(paths[name]) for name in sources})
    listed, front = card_sources(sources, paths, lic, tags=("moe",))
    experts = [f"{i}. `{e.source_model}`" for i, e in enumerate(cfg.experts)]
    experts += [f"- shared (every token): `{e.source_model}`" for e in cfg.shared_experts or []]
    intro = [
        f"A {_NAMES[src.arch]} mixture of {len(cfg.experts)} experts ({cfg.experts_per_token} per token) made with "
        f"evomerge from dense fine-tunes: attention, norms and embeddings from `{cfg.base_model}`, each "
        f"expert the MLPs of one model, the routers initialised by `{cfg.gate_mode}`.",
        "",
        "## Experts",
        "",
        *experts,
    ]
    config = ("Config", CONFIG_FILE, "mergekit-moe", config_text)
    return render_card(front, "Mixture of experts", intro, listed, why, extra, config)
