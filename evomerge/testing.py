"""Small deterministic model directories for tests, benchmarks and examples.

Models are made from a transformers config with seeded random weights, and
fine-tunes are the base plus a seeded perturbation, so that task vectors are
small against the weights as in real fine-tunes.
"""

from __future__ import annotations

from pathlib import Path

import torch


def llama_config(hidden: int = 32, layers: int = 2, vocab: int = 64, intermediate: int | None = None, heads: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def save_model(state: dict[str, torch.Tensor], config, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``state`` as a Hugging Face model directory (safetensors + config.json)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(path)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in state.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


def random_llama_state(config, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for ``config`` (a LlamaForCausalLM state dict)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            state[name] = 0.02 * torch.randn(p.shape, generator=gen)
    return state


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.005) -> dict[str, torch.Tensor]:
    """``state`` plus seeded Gaussian noise: a stand-in fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def make_family(
    root: Path, n_finetunes: int = 2, *, seed: int = 0, dtype: torch.dtype = torch.float32, **cfg
) -> list[Path]:
    """A base and ``n_finetunes`` fine-tunes under ``root``: [base, ft1, ft2, ...]."""
    config = llama_config(**cfg)
    base = random_llama_state(config, seed)
    paths = [save_model(base, config, root / "base", dtype)]
    for i in range(n_finetunes):
        paths.append(save_model(perturbed(base, seed + 1 + i), config, root / f"ft{i + 1}", dtype))
    return paths


def populate_hub_cache(cache: Path, repo_id: str, model_dir: Path, *, commit: str, branch: str = "main") -> Path:
    """Lay ``model_dir`` out in a Hugging Face Hub cache as ``huggingface_hub`` would after a
    download of ``repo_id`` at ``commit`` (blobs, a snapshot of links, a ref for ``branch``);
    return the snapshot directory."""
    import hashlib
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snapshot / f.name
        if not link.exists():
            link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot
