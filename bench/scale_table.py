"""README's "Scale" table: what each memory placement needs per worker, from the plan's
own arithmetic (``evomerge.search.memory``) on Llama-shaped configs; no weights, no GPU.
A cell is the plan on one worker of that GPU size: the fewest GPUs a worker needs
(``gpus_per_worker``, the model split by layers), resident sources before streamed.

Seconds per candidate are estimates, not measurements: the merge reads every input
once and writes the model (at ``HBM`` bytes/s on the GPU); streamed sources cross
PCIe first (at ``PCIE`` bytes/s from pinned memory), which bounds them.

    python bench/scale_table.py
"""

from __future__ import annotations

from evomerge.search.memory import GIB, MARGIN, llama_footprint

HBM = 2.0e12  # bytes/s a merge kernel sustains on an H100-class GPU (assumed)
PCIE = 25e9  # bytes/s of pinned host-to-device copies over PCIe 4.0 x16 (assumed)
MODELS = {
    "Llama-3.2-1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "Mistral-7B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
    ),
    "Llama-3-70B": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}
GPUS = (24, 48, 80)
SPLITS = (1, 2, 4, 8)  # gpus_per_worker tried, fewest first


def fit(fp, gib: float) -> str:
    """The plan on GPUs of ``gib`` GB: the fewest GPUs per worker, resident before streamed."""
    usable = gib * 1e9 / GIB * (1 - MARGIN)
    for k in SPLITS:
        for placement in ("resident", "streamed"):
            if fp.device_bytes(placement, "cuda", k) / GIB <= usable:
                return placement if k == 1 else f"{placement}, {k} GPUs"
    return "no"


def main() -> None:
    print(
        "| model (bf16) | sources | resident GiB | streamed GiB | host GiB (streamed) | "
        + " | ".join(f"{g} GB GPU" for g in GPUS)
        + " | s/candidate resident | s/candidate streamed |"
    )
    print("| --- | ---: | ---: | ---: | ---: | " + " | ".join("---" for _ in GPUS) + " | ---: | ---: |")
    for name, config in MODELS.items():
        for sources in (2, 4):
            fp = llama_footprint(config, sources, 2)
            resident, streamed = fp.device_bytes("resident") / GIB, fp.device_bytes("streamed") / GIB
            fits = [fit(fp, g) for g in GPUS]
            merge = (fp.sources + fp.model) / HBM
            print(
                f"| {name} | {sources} | {resident:.1f} | {streamed:.1f} | {fp.sources / GIB:.1f} | "
                + " | ".join(fits)
                + f" | {merge:.2f} | {merge + fp.sources / PCIE:.1f} |"
            )


if __name__ == "__main__":
    main()
