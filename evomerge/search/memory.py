"""Where a search worker keeps its sources: the memory plan, decided before any worker starts.

A worker holds one resident model (each candidate overwrites its tensors) and the
sources every candidate is merged from. ``resident`` keeps the sources on the merge
device; ``streamed`` keeps them in host memory (pinned when the device is a GPU) and
copies each planned tensor's inputs to the device just before it is merged, at most
``read_ahead`` bytes ahead, so the device holds one model plus a few tensors.

The arithmetic, per worker (bytes in the search dtype, from the safetensors headers):

* merge temporaries: the largest tensor's inputs widened to float32, plus the float32
  result and its cast: ``(inputs + 2) * largest_numel * 4``;
* scoring: the native scorer's batch, ``rows`` items of ``width`` tokens (the longest
  item of the fitness's samples, when the planner could encode them; else
  ``SCORE_ROWS`` x ``SCORE_WIDTH``): one layer's working set (the hidden state twice,
  the MLP's three intermediate states) for every token, the KV cache of every layer
  for every token, and float32 logits at the answer positions only (``answers`` a
  row, else ``SCORE_ANSWERS``), where the native scorer runs its output head;
* resident: device = model + sources + temporaries + activations; host = 0;
* streamed: device = model + read-ahead + temporaries + activations; host = sources.
* a worker on ``k`` GPUs (``gpus_per_worker``) holds the resident model and its
  resident sources split by layers: each GPU ``(model + sources) / k`` plus one
  largest tensor of each (the embeddings, which a layer split cannot divide), and the
  temporaries and activations whole (the merge and the forward pass go GPU by GPU).

On the CPU the device is host memory: both placements need the same, which the
budget must hold (``auto`` keeps the sources resident there).

Neither counts the process itself (Python, torch and the libraries: about 0.7 GiB of
host memory on the CPU, measured) nor, on a GPU, the CUDA context: the default budget
is what is free when the plan is made, and a margin of ``MARGIN`` is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from evomerge.errors import EvomergeError

GIB = 1 << 30
READ_AHEAD_BYTES = 256 << 20  # what the streamed copy may run ahead of the merge (at least one tensor's inputs)
SCORE_ROWS, SCORE_WIDTH, SCORE_ANSWERS = 160, 256, 16  # the scoring batch when its samples are not known
MARGIN = 0.10  # of the budget, kept free

Placement = Literal["auto", "resident", "streamed"]


@dataclass(frozen=True)
class Footprint:
    """What a search over some sources holds, in bytes of the search dtype."""

    model: int  # the resident model (the sources' first model's tensors)
    sources: int  # every source's tensors
    largest: int  # elements of the largest tensor
    inputs: int  # inputs of one planned tensor (the sources merged into it)
    hidden: int
    intermediate: int  # the MLP's width
    layers: int
    kv: int  # key (and value) width per token and layer
    vocab: int
    itemsize: int
    rows: int = SCORE_ROWS  # the scoring batch: items
    width: int = SCORE_WIDTH  # tokens of its longest item
    answers: int = SCORE_ANSWERS  # answer tokens of its longest answer

    @property
    def temporaries(self) -> int:
        return (self.inputs + 2) * self.largest * 4

    @property
    def activations(self) -> int:
        tokens = self.rows * self.width
        layer = tokens * (2 * self.hidden + 3 * self.intermediate) * self.itemsize
        cache = tokens * self.layers * 2 * self.kv * self.itemsize
        return layer + cache + self.rows * self.answers * self.vocab * 4

    def scoring(self, rows: int, width: int, answers: int) -> Footprint:
        """This footprint for a scoring batch of ``rows`` items, ``width`` tokens at most,
        ``answers`` answer tokens at most."""
        return replace(self, rows=rows, width=width, answers=answers)

    @property
    def read_ahead(self) -> int:
        # at least one tensor's inputs; never more than all of them
        return min(self.sources, max(READ_AHEAD_BYTES, self.inputs * self.largest * self.itemsize))

    def device_bytes(self, placement: str, device: str = "cuda", gpus: int = 1) -> int:
        """Per device (each of a worker's ``gpus``). On the CPU nothing is copied ahead: the
        merge reads streamed sources in place."""
        ahead = 0 if not device.startswith("cuda") else self.read_ahead
        held = self.sources if placement == "resident" else ahead
        if gpus == 1:
            return self.model + held + self.temporaries + self.activations
        models = 1 + (self.inputs if placement == "resident" else 0)
        split = (self.model + (held if placement == "resident" else 0)) // gpus + models * self.largest * self.itemsize
        return split + (0 if placement == "resident" else held) + self.temporaries + self.activations

    def host_bytes(self, placement: str) -> int:
        return 0 if placement == "resident" else self.sources


@dataclass(frozen=True)
class MemoryPlan:
    """A worker's placement and what it needs where (GiB); the budget it was fitted to."""

    placement: Literal["resident", "streamed"]
    device: str
    device_gib: float
    host_gib: float
    budget_gib: float | None  # None: not known where the plan was made (a cluster's GPUs)
    read_ahead: int
    gpus: int = 1  # devices of one worker (its layers split over them); the figures are per device

    @property
    def per(self) -> str:
        return "per worker" if self.gpus == 1 else f"per GPU ({self.gpus} a worker)"

    def summary(self) -> dict[str, object]:
        return {
            "placement": self.placement,
            "device": self.device,
            "device_gib": round(self.device_gib, 3),
            "host_gib": round(self.host_gib, 3),
            "budget_gib": None if self.budget_gib is None else round(self.budget_gib, 3),
            "gpus_per_worker": self.gpus,
        }

    def line(self) -> str:
        return (
            f"memory: sources {self.placement} ({self.device}): {self.device_gib:.2f} GiB {self.per} on the device, "
            f"{self.host_gib:.2f} GiB in host memory, budget "
            + ("unknown here" if self.budget_gib is None else f"{self.budget_gib:.2f} GiB")
        )


def footprint(paths: list[str], dtype_bytes: int) -> Footprint:
    """The footprint of a search over the model directories ``paths`` (the first is the
    resident model's), read from their headers and configs only."""
    from evomerge.operators.checkpoint import open_checkpoint

    sizes, largest, config = [], 0, {}
    for i, path in enumerate(paths):
        ck = open_checkpoint(Path(path))
        try:
            numels = [math.prod(info.shape) for info in ck.tensors.values() if info.dtype.is_floating_point]
        finally:
            ck.close()
        sizes.append(sum(numels) * dtype_bytes)
        largest = max([largest, *numels])
        if i == 0:
            config = ck.config
    return Footprint(
        model=sizes[0],
        sources=sum(sizes),
        largest=largest,
        inputs=len(paths),
        **_shape(config),
        itemsize=dtype_bytes,
    )


def _shape(config: dict) -> dict[str, int]:
    """The widths the scoring term needs, from a model's config (0 where it names none)."""
    get = lambda key, default=0: int(config.get(key) or default)  # noqa: E731
    hidden, heads = get("hidden_size"), get("num_attention_heads", 1)
    head_dim = get("head_dim", hidden // max(1, heads))
    return {
        "hidden": hidden,
        "intermediate": get("intermediate_size"),
        "layers": get("num_hidden_layers"),
        "kv": get("num_key_value_heads", heads) * head_dim,
        "vocab": get("vocab_size"),
    }


def llama_footprint(config: dict, sources: int, itemsize: int) -> Footprint:
    """The footprint of ``sources`` models (base included) of a Llama-shaped ``config``
    (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, vocab_size, tie_word_embeddings), without any weights."""
    h, i, layers, v = (int(config[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    kv = h * int(config.get("num_key_value_heads", config["num_attention_heads"])) // int(config["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    numel = v * h * (1 if config.get("tie_word_embeddings") else 2) + layers * per_layer + h
    model = numel * itemsize
    return Footprint(
        model=model,
        sources=model * sources,
        largest=max(v * h, h * i),
        inputs=sources,
        **_shape(config),
        itemsize=itemsize,
    )


def plan_memory(
    fp: Footprint, placement: Placement, device: str, budget_gib: float | None, *, gpus: int = 1
) -> MemoryPlan:
    """The placement for ``fp`` within ``budget_gib`` per device (a worker holds ``gpus``):
    ``auto`` is resident when that fits (less the margin), else streamed; a plan that does
    not fit is refused. Without a budget (GPUs the planning process cannot see) ``auto``
    is resident."""
    usable = float("inf") if budget_gib is None else budget_gib * (1 - MARGIN)
    # on the CPU the device is the host: streaming saves nothing there, the budget holds both
    on_host = not device.startswith("cuda")
    need = {
        p: (fp.device_bytes(p, device, gpus) + (fp.host_bytes(p) if on_host else 0)) / GIB
        for p in ("resident", "streamed")
    }
    if placement == "auto":
        chosen = "resident" if need["resident"] <= usable else "streamed"
    else:
        chosen = placement
    if need[chosen] > usable:
        hint = "" if chosen == "streamed" or need["streamed"] > usable else " (placement: streamed fits)"
        raise EvomergeError(
            f"device_memory_gib: a worker needs {need[chosen]:.2f} GiB "
            + ("" if gpus == 1 else f"on each of its {gpus} GPUs ")
            + f"on {device} with its sources {chosen} "
            f"(model {fp.model / GIB:.2f}, sources {fp.sources / GIB:.2f}, merge temporaries "
            f"{fp.temporaries / GIB:.2f}, scoring {fp.activations / GIB:.2f} GiB); the budget is {budget_gib:.2f} GiB "
            f"less a {MARGIN:.0%} margin{hint}"
        )
    return MemoryPlan(
        placement=chosen,  # type: ignore[arg-type]
        device=device,
        device_gib=fp.device_bytes(chosen, device, gpus) / GIB,
        host_gib=fp.host_bytes(chosen) / GIB,
        budget_gib=budget_gib,
        read_ahead=fp.read_ahead,
        gpus=gpus,
    )


def default_budget_gib(device: str, workers: int) -> float | None:
    """What one worker may use: a GPU's free memory (each worker has its own; None when
    this process sees no GPU, as a driver off a cluster's GPU nodes), or the host's
    available memory shared by the workers of this machine."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free / GIB
    import psutil

    return psutil.virtual_memory().available / GIB / max(1, workers)
