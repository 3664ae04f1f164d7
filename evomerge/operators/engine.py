"""The streaming merge engine: recipe in, Hugging Face model directory out.

Tensors are read one output at a time (the next one prefetched on a thread
while the current one is merged), merged in float32 on the chosen device,
cast to the output dtype and appended to a streaming shard writer. Peak
memory is a few tensors per input, whatever the size of the models.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import EvomergeError, MergeError
from evomerge.operators import kernels
from evomerge.operators.checkpoint import Checkpoint, open_checkpoint
from evomerge.operators.finite import NonFiniteResult, all_finite, checked
from evomerge.operators.outputs import write_model_files
from evomerge.operators.plan import MergePlan, PlannedTensor, Ref, build_plan
from evomerge.operators.recipe import Recipe
from evomerge.operators.registry import Operator
from evomerge.operators.writer import ShardWriter, atomic_directory

DEFAULT_SHARD_BYTES = 5 * 1024**3
ModelResolver = Callable[[str], Path]


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    bytes: int
    seconds: float
    files: list[str]


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the merge seed and the tensor name (order- and device-independent)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def load_inputs(
    pt: PlannedTensor, ckpts: dict[str, Checkpoint], device: torch.device, *, check_finite: bool = True
) -> tuple[list[Tensor], Tensor | None]:
    """One planned tensor's inputs in their stored dtype, cut or padded to the planned
    vocabulary. ``check_finite`` checks each for NaN/Inf as it is read; it may be off
    when the operator propagates non-finite values (:func:`merge_planned` then names
    a bad input from the result) or for resident sources that were checked once."""

    def one(ref: Ref) -> Tensor:
        # asked for on the merge device: a resident source tensor already there comes back
        # as it is (no copy to the host and back), a file's is read and moved once
        t = ckpts[ref.model].get(ref.tensor, device)
        if check_finite:
            _check_input(t, ref)
        return t

    tensors = [one(r) for r in pt.sources]
    base = one(pt.base) if pt.base else None
    if pt.vocab is not None:  # rows in the output vocabulary's order
        refs = [*pt.sources, *([pt.base] if pt.base else [])]
        every = dict(zip([r.model for r in refs], [*tensors, *([base] if base is not None else [])]))
        tensors = [pt.vocab.align(r.model, t, every) for r, t in zip(pt.sources, tensors)]
        base = pt.vocab.align(pt.base.model, base, every) if pt.base and base is not None else None
    return tensors, base


def _check_input(t: Tensor, ref: Ref) -> None:
    if t.is_floating_point() and not all_finite(t):
        raise MergeError(f"tensor '{ref.tensor}' of model '{ref.model}' contains NaN or Inf")


def checks_inputs_on_read(pt: PlannedTensor, plan: MergePlan) -> bool:
    """Whether the streaming merge checks ``pt``'s inputs as it reads them: not when the
    operator propagates NaN/Inf into the result (checked anyway), unless rows are cut."""
    return not plan.operator.nonfinite_propagates or pt.vocab_rows is not None


def merge_planned(
    pt: PlannedTensor, plan: MergePlan, inputs, device: torch.device, seed: int, into: Tensor | None = None
) -> Tensor:
    """Merge one planned tensor from its loaded inputs; the result is checked finite.

    With ``into`` (a tensor of the planned shape and dtype that overlaps no input) the
    result is written there and ``into`` returned: by the operator itself when it
    ``writes_out`` and ``into`` is contiguous, else copied. After a failure ``into``
    may hold part of a result."""
    tensors, base = inputs
    extra: dict[str, Any] = {}
    op = plan.operator
    if op.mixed_precision:  # widens its inputs itself, may return pt.dtype directly
        extra["out_dtype"] = pt.dtype
        if into is not None and op.writes_out and into.dtype == pt.dtype and into.is_contiguous():
            extra["out"] = into.view(pt.shape)
    else:
        tensors = [t.to(torch.float32) for t in tensors]
        base = base.to(torch.float32) if base is not None else None
    gen = None
    if op.random:
        gen = torch.Generator(device=device).manual_seed(tensor_seed(seed, pt.name))
    try:
        out = op.fn(tensors, base, gen, **pt.params, **extra)
        stored = out.to(pt.dtype)  # checked after the cast: a value beyond the dtype's range is Inf there
        if not (op.checks_finite and stored is out):  # else the operator checked it
            checked(stored)
    except NonFiniteResult:
        for t, ref in zip([*inputs[0], inputs[1]], [*pt.sources, pt.base]):
            if t is not None and ref is not None:
                _check_input(t, ref)  # a bad input is named, not the result
        raise MergeError(f"tensor '{pt.name}': the merge produced NaN or Inf") from None
    except MergeError as err:
        raise MergeError(f"tensor '{pt.name}': {err}") from None
    if into is None:
        return stored
    if stored.data_ptr() != into.data_ptr():  # not written in place
        into.copy_(stored.view(into.shape))
    return into


def resolve_model_path(name: str, recipe_dir: Path | None = None) -> Path:
    """A recipe's model reference as a local directory: as given, else relative to the
    recipe, else a Hub id (``org/name[@revision]``) resolved through the Hub cache."""
    from evomerge.operators.hub import parse_hub_id, resolve_hub_id

    p = Path(name).expanduser()
    if p.exists():
        return p
    if recipe_dir is not None and not p.is_absolute() and (recipe_dir / p).exists():
        return recipe_dir / p
    hub = parse_hub_id(name)
    return resolve_hub_id(hub) if hub is not None else p


def open_sources(recipe: Recipe, resolver: ModelResolver, allow_pickle: bool) -> dict[str, Checkpoint]:
    return {name: open_checkpoint(resolver(name), allow_pickle=allow_pickle) for name in recipe.referenced_models()}


def pick_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device that exists on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise EvomergeError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise EvomergeError(f"--device {device}: evomerge merges on cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EvomergeError(f"--device {device}: no CUDA device is available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < count:
            raise EvomergeError(
                f"--device {device}: this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
            )
    return dev


def run_merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    allow_pickle: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    resolver: ModelResolver | None = None,
    progress: Callable[[int, int], None] | None = None,
    card_extra: str = "",
    before_commit: Callable[[Path], list[str]] | None = None,
) -> MergeResult:
    """Merge ``recipe`` into the Hugging Face model directory ``out_dir`` (atomically).

    ``before_commit`` sees the finished directory under its temporary name (it may
    evaluate it and add files, whose names it returns) before the directory takes its
    final name; if it raises, nothing is left behind."""
    start = time.perf_counter()
    dev = pick_device(device)
    ckpts = open_sources(recipe, resolver or resolve_model_path, allow_pickle)
    plan = build_plan(recipe, ckpts)
    if plan.operator.cpu_kernels and dev.type == "cpu":
        kernels.warm_in_background()
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, [(t.name, t.shape, t.dtype) for t in plan.tensors], max_shard_bytes)
        try:
            _stream(plan, ckpts, writer, dev, seed, progress)
            files = writer.finish()
        finally:
            writer.abort()
        files += write_model_files(plan, ckpts, tmp, seed=seed, card_extra=card_extra)
        if before_commit is not None:
            files = sorted(set(files + before_commit(tmp)))
    nbytes = sum(t.dtype.itemsize * math.prod(t.shape) for t in plan.tensors)
    return MergeResult(out, len(plan.tensors), nbytes, time.perf_counter() - start, files)


@contextmanager
def _leave_a_core(dev: torch.device, op: Operator) -> Iterator[None]:
    """Torch-path merges on the CPU run on one thread fewer than torch's count (at least
    one), leaving a core to the reader thread: they are light next to the reads, and
    with three busy threads on two cores OpenMP's spinning barriers lose more than the
    third thread gains (measured on 2 cores, 6 runs each: a linear merge 2.21 s median
    against 2.51). The numba kernels are heavy and keep every thread (TIES: 3.54 s
    against 3.66)."""
    threads = torch.get_num_threads()
    if dev.type == "cpu" and threads > 1 and not op.cpu_kernels:
        torch.set_num_threads(threads - 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _input_bytes(pt: PlannedTensor, ckpts: dict[str, Checkpoint]) -> int:
    refs = [*pt.sources, *([pt.base] if pt.base else [])]
    return sum(ckpts[r.model].tensors[r.tensor].nbytes for r in refs)


def _stream(plan: MergePlan, ckpts, writer: ShardWriter, dev: torch.device, seed: int, progress) -> None:
    """Merge tensor by tensor while a reader thread reads ahead: as many planned
    tensors as fit in READ_AHEAD_BYTES of inputs (at least the next one), so that a
    slow step (a large tensor, the kernels' start-up) does not leave it idle."""
    items = plan.tensors
    sizes = [_input_bytes(pt, ckpts) for pt in items]
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-read")
    with _leave_a_core(dev, plan.operator), reader as pool:
        pending: deque[Future] = deque()
        queued = held = 0  # tensors submitted so far; input bytes submitted and not yet merged

        def refill() -> None:
            nonlocal queued, held
            while queued < len(items) and (not pending or held + sizes[queued] <= READ_AHEAD_BYTES):
                pt = items[queued]
                pending.append(pool.submit(load_inputs, pt, ckpts, dev, check_finite=checks_inputs_on_read(pt, plan)))
                held += sizes[queued]
                queued += 1

        try:
            refill()
            for i, pt in enumerate(items):
                inputs = pending.popleft().result()
                writer.write(pt.name, merge_planned(pt, plan, inputs, dev, seed))
                del inputs
                held -= sizes[i]
                refill()
                if progress:
                    progress(i + 1, len(items))
        finally:
            for f in pending:
                f.cancel()


READ_AHEAD_BYTES = 256 * 1024**2  # inputs read ahead of the merge (a bound on memory, not on model size)
