"""A merge worker: source models resident on one device, candidates merged in memory.

The worker loads every source once and owns one resident model whose parameters
each candidate overwrites in place with the same planner and operators as the
one-shot merge (no disk per candidate). It then scores the model with the fitness
evaluator. The sources stay on its device (``resident``) or in host memory
(``streamed``: pinned, each tensor's inputs copied to the device on a side stream
ahead of its merge; see :mod:`evomerge.search.memory`). Nothing here knows of Ray.
"""

from __future__ import annotations

import copy
import math
import socket
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.fitness.evaluate import Evaluator, FitnessConfig
from evomerge.operators.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from evomerge.operators.engine import load_inputs, merge_planned, tensor_seed
from evomerge.operators.plan import build_plan, replan, structure
from evomerge.operators.recipe import Recipe
from evomerge.search.hostpeak import HostPeak
from evomerge.search.split import split_by_layers, worker_devices
from evomerge.shipping import fetch, mirrored


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to set itself up (picklable)."""

    sources: dict[str, str]  # model ref -> local directory
    model_ref: str  # the source whose architecture and tokenizer the resident model takes
    fitness: dict[str, Any]
    zoo_root: str | None
    base_dir: str
    seed: int
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    placement: str = "resident"  # or "streamed": the sources in host memory (evomerge.search.memory)
    read_ahead: int = 256 << 20  # streamed: bytes copied ahead of the merge at most
    gpus_per_worker: int = 1  # devices the resident model is split over by layers (evomerge.search.split)
    stack: bool = False  # candidates are layer stacks (passthrough slices), evaluated without merging weights
    moe: bool = False  # candidates are mixtures of experts on the base ``model_ref`` (evomerge.search.moe_models)
    # for a node that cannot see the driver's paths (evomerge.shipping): the fitness's files,
    # and with ``models_from: driver`` each source's files, as Files or a stored handle of them
    fitness_files: Any = None
    shipped_models: dict[str, Any] | None = None
    # sources named by a Hub id: resolved through this node's Hub cache when their driver path is not here
    hub_ids: dict[str, str] = field(default_factory=dict)
    # started with the worker, stopped by ``stop``: an object whose ``start()`` returns a stop
    # function (the experiment's system-metrics logging); the worker knows nothing more of it
    monitor: Any = None


@dataclass(frozen=True)
class Job:
    """One evaluation: a recipe (with model refs as names), at a fidelity, on a split."""

    key: int
    recipe: dict[str, Any]
    seed: int
    fraction: float = 1.0
    split: str | None = None
    attempt: int = 0
    prior: dict[str, list[bool]] | None = None  # per-sample results of this candidate's lower fidelity
    items: dict[str, list[int]] | None = None  # score only these sample positions per task (an estimator's anchors)


@dataclass
class JobResult:
    key: int
    value: float = float("nan")
    values: list[float] = field(default_factory=list)
    tasks: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    merge_seconds: float = 0.0
    score_seconds: float = 0.0
    error: str | None = None
    fraction: float = 1.0
    split: str | None = None
    per_sample: dict[str, list[bool]] = field(default_factory=dict)
    node: str | None = None  # where it ran, when the dispatcher knows (a Ray node id)
    # the worker's peak memory so far on its device (GiB; the most on any one of a split
    # worker's GPUs): tensors allocated on a GPU, host memory above the worker's start on the CPU
    peak_gib: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def resident_checkpoint(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    pin: bool = False,
    where: dict[str, torch.device] | None = None,
    order: list[str] | None = None,
) -> Checkpoint:
    """Every tensor of a model directory, loaded once onto ``device`` (host memory pinned
    for asynchronous copies to a GPU when ``pin``), or onto ``where[name]`` when named there;
    packed end to end in ``order`` (the resident model's), see :func:`arena`."""
    ck = open_checkpoint(path)
    layout = {
        name: (dtype if info.dtype.is_floating_point else info.dtype, (where or {}).get(name, device), info.shape)
        for name, info in ck.tensors.items()
    }
    state = arena(layout, order or list(layout), pin=pin)
    for name in layout:  # read into place: the device holds the packed copy and one tensor at most
        state[name].copy_(ck.get(name))
    ck.close()
    infos = {k: TensorInfo(k, path, v.dtype, tuple(v.shape)) for k, v in state.items()}
    return Checkpoint(path, ck.config, infos, pickled=state)


def arena(
    layout: dict[str, tuple[torch.dtype, torch.device, tuple[int, ...]]], order: list[str], *, pin: bool = False
) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of ``layout`` (name -> dtype, device, shape), each a view of
    one flat buffer per dtype and device, end to end in ``order`` (the rest after it).
    Tensors that follow each other in the resident model then follow each other in
    every source too, so a run of them sharing its merge parameters can be merged as
    one (:meth:`MergeWorker.merge`). The buffers are pinned when ``pin``."""
    rank = {name: i for i, name in enumerate(order)}
    groups: dict[tuple, list[str]] = {}
    for name in sorted(layout, key=lambda n: rank.get(n, len(rank))):
        groups.setdefault(layout[name][:2], []).append(name)
    out = {}
    for (dtype, device), names in groups.items():
        sizes = [math.prod(layout[n][2]) for n in names]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device, pin_memory=pin)
        at = 0
        for name, size in zip(names, sizes):
            out[name] = flat[at : at + size].view(layout[name][2])
            at += size
    return out


def pack_parameters(model: torch.nn.Module, device: torch.device) -> None:
    """Move the model to ``device`` with its parameters end to end, in their order, in one
    flat buffer per dtype (tied parameters stay one tensor): the device holds the
    packed copy and nothing more."""
    params = dict(model.named_parameters())
    views = arena({n: (p.dtype, device, tuple(p.shape)) for n, p in params.items()}, list(params))
    for name, param in params.items():
        views[name].copy_(param.data)
        param.data = views[name]
    model.to(device)  # the buffers (rotary frequencies)


class StackedModels:
    """The sources resident as modules, and one shell model whose layer list is rebuilt
    for each candidate stack from references to the sources' layers: no weight is
    copied. Embeddings come from the stack's first model, the final norm and the output
    head from its last, as in the exported passthrough merge (the engine's plan), so the
    scored model is the exported one. The rest of the config (rotary embeddings, norm
    epsilon) is the first listed model's; the space refuses models whose shapes differ."""

    def __init__(self, sources: dict[str, Path], device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        from evomerge.fitness.scoring import load_model

        self.models = {}
        tokenizers = {}
        for ref, path in sources.items():
            self.models[ref], tokenizers[ref] = load_model(path, device, dtype)
        self.tokenizer = next(iter(tokenizers.values()))  # the models share a vocabulary (checked by the space)
        first = next(iter(sources.values()))
        config = AutoConfig.from_pretrained(first)
        self.depth_keys = [
            k for k, v in config.to_dict().items() if isinstance(v, list) and len(v) == config.num_hidden_layers
        ]
        config.num_hidden_layers = 0
        for key in self.depth_keys:
            setattr(config, key, [])
        config.use_cache = False  # a stack may hold one layer twice: one KV-cache slot per layer would clash
        self.shell = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()

    def assemble(self, recipe: Recipe):
        """The shell, its layers now the recipe's stack (references, not copies)."""
        from evomerge.search.stack import stack_of

        stack = stack_of(recipe)
        if stack is None:
            raise EvomergeError("a layer-stack worker evaluates passthrough slices only")
        unknown = sorted({m for m, _, _ in stack} - set(self.models))
        if unknown:
            raise EvomergeError(f"the stack names models that are not resident: {unknown}")
        first, last = self.models[stack[0][0]], self.models[stack[-1][0]]
        body = self.shell.get_decoder()
        body.layers = torch.nn.ModuleList(self._layer(m, i, scale) for m, i, scale in stack)
        body.embed_tokens = first.get_decoder().embed_tokens
        body.norm = last.get_decoder().norm
        self.shell.lm_head = first.lm_head if self.shell.config.tie_word_embeddings else last.lm_head
        self.shell.config.num_hidden_layers = len(stack)
        for key in self.depth_keys:
            setattr(self.shell.config, key, [getattr(self.models[m].config, key)[i] for m, i, _ in stack])
        return self.shell

    def _layer(self, model: str, index: int, scale: float) -> torch.nn.Module:
        """A resident layer; with a residual scale, a twin that shares every weight but
        the scaled copies of its residual projections (computed as the export does:
        float32 times the scale, back to the resident dtype)."""
        from evomerge.search.stack import RESIDUAL

        layer = self.models[model].get_decoder().layers[index]
        if scale == 1.0:
            return layer
        twin = _shallow(layer)
        for path, module in list(layer.named_modules()):
            if path.rsplit(".", 1)[-1] not in RESIDUAL:
                continue
            owner = twin
            for part in path.split(".")[:-1]:
                child = _shallow(getattr(owner, part))
                setattr(owner, part, child)
                owner = child
            scaled = _shallow(module)
            for name, param in module.named_parameters(recurse=False):
                value = (param.detach().to(torch.float32) * scale).to(param.dtype)
                setattr(scaled, name, torch.nn.Parameter(value, requires_grad=False))
            setattr(owner, path.rsplit(".", 1)[-1], scaled)
        return twin


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` that shares its parameters and children until they are replaced."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)  # type: ignore[assignment]
    twin._parameters = dict(module._parameters)  # type: ignore[assignment]
    return twin


class MergeWorker:
    """Merges and scores candidates against resident sources."""

    def __init__(self, spec: WorkerSpec):
        from evomerge.fitness.scoring import load_model, pick_device
        from evomerge.operators.recipe import DTYPES

        if spec.threads:
            torch.set_num_threads(spec.threads)  # after imports: a module may have set it
        spec = replace(spec, sources=local_sources(spec))
        self.spec = spec
        self._files_root = fetch(spec.fitness_files).materialize() if spec.fitness_files is not None else None
        self.device = pick_device(spec.device)
        # host memory above the process before the sources (imports and all); on the CPU only
        self._host_peak = HostPeak() if self.device.type != "cuda" else None
        dtype = DTYPES[spec.dtype]
        if spec.stack:
            self.stacks = StackedModels({r: Path(p) for r, p in spec.sources.items()}, self.device, dtype)
            self.model, self.tokenizer = self.stacks.shell, self.stacks.tokenizer
        elif spec.moe:
            from evomerge.search.moe_models import MoEModels

            sources = {r: Path(p) for r, p in spec.sources.items()}
            self.mixtures = MoEModels(sources, spec.model_ref, self.device, dtype)
            self.model, self.tokenizer = None, self.mixtures.tokenizer
        else:
            streamed = spec.placement == "streamed"
            self.devices = worker_devices(self.device, spec.gpus_per_worker)
            split = len(self.devices) > 1
            self.model, self.tokenizer = load_model(Path(spec.sources[spec.model_ref]), torch.device("cpu"), dtype)
            if split:
                split_by_layers(self.model, self.devices)
            else:
                pack_parameters(self.model, self.device)
            self.params = self.model.state_dict()
            held = torch.device("cpu") if streamed else self.device
            # resident sources sit beside the tensors they merge into (a split model's devices)
            where = None if streamed or not split else {k: v.device for k, v in self.params.items()}
            pin = streamed and self.device.type == "cuda"
            order = list(self.params)
            self.sources = {
                ref: resident_checkpoint(Path(p), held, dtype, pin=pin, where=where, order=order)
                for ref, p in spec.sources.items()
            }
            # the resident model's own tokenizer: the one ready() encodes the samples with
            self._tokenizers = {spec.model_ref: self.tokenizer}
        fitness = FitnessConfig.model_validate(spec.fitness)
        self._fitness = fitness
        self._evaluators: dict[str, Evaluator] = {}
        self._aligned: dict[tuple, Any] = {}
        self._contiguous: dict[tuple, bool] = {}  # (recipe structure, tensor index) -> merged in one run with the last
        self._plans: dict[str, Any] = {}  # recipe structure -> its last plan
        self._resident: dict[str, list] = {}  # recipe structure -> each planned tensor's inputs, used in place
        self.copied_bytes = 0  # host-to-device bytes of the last candidate's inputs
        self._stop_monitor = spec.monitor.start() if spec.monitor is not None else None

    def stop(self) -> None:
        """Stop what started with the worker (its system-metrics logging, a sampling
        thread of its host peak); idempotent."""
        stop, self._stop_monitor = self._stop_monitor, None
        if stop is not None:
            stop()
        if self._host_peak is not None:
            self._host_peak.close()

    def evaluator(self, split: str | None) -> Evaluator:
        key = split or self._fitness.split
        if key not in self._evaluators:
            self._evaluators[key] = Evaluator(
                self._fitness,
                zoo_root=Path(self.spec.zoo_root) if self.spec.zoo_root else None,
                base_dir=Path(self.spec.base_dir),
                seed=self.spec.seed,
                split=key,
                files_root=self._files_root,
            )
        return self._evaluators[key]

    @torch.no_grad()
    def merge(self, recipe: Recipe, seed: int) -> None:
        """Overwrite the resident model's tensors with the merge of ``recipe``."""
        key, plan = self._plan(recipe)
        self._fit_vocabulary(plan)
        unknown = next((pt.name for pt in plan.tensors if pt.name not in self.params), None)
        if unknown is not None:
            raise EvomergeError(f"merged tensor '{unknown}' is not a parameter of the resident model")
        self.copied_bytes = 0
        run: list[tuple[Any, Any, torch.Tensor]] = []
        for i, (pt, inputs) in enumerate(self._stream(key, plan.tensors)):
            target = self.params[pt.name]
            if run and not self._follows(plan, (key, i), run[-1], (pt, inputs, target)):
                _merge_run(plan, run, seed)
                run = []
            run.append((pt, inputs, target))
        if run:
            _merge_run(plan, run, seed)

    def _stream(self, key: str, tensors: list) -> Iterator[tuple[Any, Any]]:
        """Each planned tensor with its inputs on the merge device. Resident sources are
        used in place (the same tensors for every candidate of a recipe structure: looked
        up once). Streamed ones are copied from pinned host memory on a side CUDA stream,
        up to ``read_ahead`` bytes ahead of the merge, which waits for each tensor's copy
        (an event) before using it; on the CPU there is nothing to copy."""
        if self.spec.placement != "streamed" or self.device.type != "cuda":
            if key not in self._resident:
                self._resident[key] = [self._inputs(pt) for pt in tensors]
            yield from zip(tensors, self._resident[key])
            return
        if len(self.devices) > 1:  # copied to each layer's device as its turn comes
            for pt in tensors:
                yield pt, self._inputs(pt)
            return
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        pending: deque = deque()
        ahead = 0
        for pt in tensors:
            pending.append(self._copy_ahead(pt, side))
            ahead += pending[-1][3]
            while pending and ahead >= self.spec.read_ahead:  # enough in flight: merge the oldest
                ahead -= pending[0][3]
                yield _arrived(pending.popleft(), main)
        while pending:
            yield _arrived(pending.popleft(), main)

    def _copy_ahead(self, pt, side) -> tuple[Any, Any, Any, int]:
        with torch.cuda.stream(side):
            inputs = self._inputs(pt)
            ready = torch.cuda.Event()
            ready.record(side)
        size = sum(t.nbytes for t in _flat(inputs))
        self.copied_bytes += size
        return pt, inputs, ready, size

    def _inputs(self, pt):
        """A planned tensor's inputs on the merge device; a vocabulary tensor's, aligned to
        the output vocabulary once and kept where the sources are (every candidate aligns
        them alike), then moved like the others."""
        device = self.params[pt.name].device  # the merge device (one of a split model's)
        if pt.vocab is None:
            return load_inputs(pt, self.sources, device, check_finite=False)
        key = (pt.name, tuple(pt.sources), pt.base, id(pt.vocab))
        if key not in self._aligned:
            where = torch.device("cpu") if self.spec.placement == "streamed" else device
            self._aligned[key] = load_inputs(pt, self.sources, where, check_finite=False)
        tensors, base = self._aligned[key]
        move = lambda t: t.to(device, non_blocking=t.is_pinned())  # noqa: E731
        return [move(t) for t in tensors], (move(base) if base is not None else None)

    def _fit_vocabulary(self, plan) -> None:
        """Give the resident model the merge's output vocabulary: its rows, and the tokenizer
        the candidate is scored with (a union's own, else the tokenizer model's). A search's
        candidates share one; a source scored alone brings its own."""
        from evomerge.fitness.scoring import load_tokenizer

        embed = self.model.get_input_embeddings().weight
        name = next((k for k, v in self.params.items() if v.data_ptr() == embed.data_ptr()), None)
        rows = next((pt.shape[0] for pt in plan.tensors if pt.name == name), embed.shape[0])
        if rows != embed.shape[0]:
            self.model.resize_token_embeddings(rows, mean_resizing=False)
            self._contiguous.clear()  # new embedding (and head) tensors, outside the packed buffer
            self._resident.clear()
            if len(self.devices) > 1:  # the new embedding and head modules: placed and hooked again
                split_by_layers(self.model, self.devices)
            self.params = self.model.state_dict()
        vocab = plan.vocab
        if vocab is not None and vocab.source == "union" and hasattr(vocab.tokenizer, "apply_chat_template"):
            self.tokenizer = vocab.tokenizer
        else:
            name = plan.tokenizer_model
            if name not in self._tokenizers:
                self._tokenizers[name] = load_tokenizer(self.sources[name].path)
            self.tokenizer = self._tokenizers[name]

    def ready(self) -> bool:
        """Returns once the sources are resident and the search split's samples are read
        and encoded (a Ray caller waits on it): the first trial costs what the others do."""
        try:
            self.evaluator(None).prepare(self.tokenizer)
        except EvomergeError:
            pass  # a bad fitness definition is reported by each job, as a failed trial, as before
        return True

    def run(self, job: Job) -> JobResult:
        """Merge and score one job; failures come back as a result with ``error`` set."""
        start = time.perf_counter()
        result = JobResult(job.key, fraction=job.fraction, split=job.split)
        try:
            if self.spec.moe:
                self.model, self.tokenizer = self.mixtures.assemble(job.recipe, tensor_seed(job.seed, "trial"))
            elif self.spec.stack:
                self.model = self.stacks.assemble(Recipe.from_dict(job.recipe, f"trial {job.key}"))
            else:
                self.merge(Recipe.from_dict(job.recipe, f"trial {job.key}"), tensor_seed(job.seed, "trial"))
            merged = time.perf_counter()
            result.merge_seconds = merged - start
            fit = self.evaluator(job.split).evaluate(
                self.model, self.tokenizer, fraction=job.fraction, prior=job.prior, items=job.items
            )
            result.score_seconds = time.perf_counter() - merged
            result.value, result.values, result.tasks, result.samples = fit.fitness, fit.values, fit.tasks, fit.samples
            result.per_sample = fit.per_sample
            result.peak_gib = self.peak_gib()
            if any(v != v for v in [result.value, *result.values]):
                result.error = "the fitness is NaN"
        except EvomergeError as err:
            result.error = str(err)
        return result

    def _plan(self, recipe: Recipe) -> tuple[str, Any]:
        """The recipe's structure and its merge plan: planned once per structure (the
        search's candidates share one), then only each tensor's parameters are resolved again."""
        key = structure(recipe)
        known = self._plans.get(key)
        plan = replan(known, recipe, self.sources) if known is not None else build_plan(recipe, self.sources)
        self._plans[key] = plan
        return key, plan

    def _follows(self, plan, at: tuple[str, int], last: tuple, this: tuple) -> bool:
        """Whether ``this`` planned tensor (index ``at`` of its recipe structure's plan) can
        be merged in one run with the ones before it: an elementwise operator, the same
        parameters, and its inputs and target right after the last one's (which depends on
        the plan's structure only: asked once)."""
        a, b = last[0], this[0]
        if not plan.operator.elementwise or plan.operator.random or (a.params is not b.params and a.params != b.params):
            return False
        if at not in self._contiguous:
            self._contiguous[at] = _contiguous(last, this)
        return self._contiguous[at]

    def peak_gib(self) -> float | None:
        """The peak memory of this worker on its device so far, comparable with the memory
        plan (which counts neither the process nor the CUDA context): the most tensor bytes
        allocated on any of its GPUs, or on the CPU host memory above its start."""
        if self.device.type == "cuda":
            devices = getattr(self, "devices", [self.device])
            return max(torch.cuda.max_memory_allocated(d) for d in devices) / (1 << 30)
        peak = None if self._host_peak is None else self._host_peak.bytes()
        return None if peak is None else peak / (1 << 30)


def local_sources(spec: WorkerSpec) -> dict[str, str]:
    """Each source's directory on this node: the files shipped from the driver (``models_from:
    driver``), else the driver's path where this node has it, else its Hub id resolved
    through this node's Hub cache; a source found none of these ways is one line naming it."""
    from evomerge.operators.hub import parse_hub_id, resolve_hub_id

    out = {}
    for ref, path in spec.sources.items():
        if spec.shipped_models and ref in spec.shipped_models:
            out[ref] = str(mirrored(fetch(spec.shipped_models[ref]).materialize(), Path(path)))
        elif Path(path).exists():
            out[ref] = path
        elif (hub := parse_hub_id(spec.hub_ids.get(ref, ""))) is not None:
            out[ref] = str(resolve_hub_id(hub))
        else:
            raise EvomergeError(
                f"models: '{ref}': {path} is not on node {socket.gethostname()} (put it on storage every node "
                "sees, name it by a Hub id, or set models_from: driver to ship it from the driver)"
            )
    return out


def _contiguous(last: tuple[Any, Any, torch.Tensor], this: tuple[Any, Any, torch.Tensor]) -> bool:
    """Every input and the target of ``this`` planned tensor right after ``last``'s, in the
    same buffer (the packed sources and model)."""
    (a, a_in, a_out), (b, b_in, b_out) = last, this
    if a.vocab is not None or b.vocab is not None or a.dtype != b.dtype or len(a_in[0]) != len(b_in[0]):
        return False
    if (a_in[1] is None) != (b_in[1] is None):
        return False
    return all(_adjacent(x, y) for x, y in zip([*_flat(a_in), a_out], [*_flat(b_in), b_out]))


def _adjacent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` starts where ``a`` ends, in the same storage, both contiguous."""
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and a.is_contiguous()
        and b.is_contiguous()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.storage_offset() == a.storage_offset() + a.numel()
    )


def _merge_run(plan, run: list[tuple[Any, Any, torch.Tensor]], seed: int) -> None:
    """Merge a run of planned tensors into their targets (an operator that writes its
    output stores straight into them): one merge over the run's span when it holds
    several (the elementwise operator gives the same bits); a non-finite result is merged
    again tensor by tensor, so that the error names the tensor."""
    if len(run) > 1:
        pt, (tensors, base), target = run[0]
        total = sum(t.numel() for _, _, t in run)
        span = lambda t: t.as_strided((total,), (1,), t.storage_offset())  # noqa: E731
        whole = replace(pt, shape=(total,))
        inputs = ([span(t) for t in tensors], span(base) if base is not None else None)
        try:
            merge_planned(whole, plan, inputs, target.device, seed, into=span(target))
        except EvomergeError:
            pass  # merged below one by one, to name the tensor
        else:
            return
    for pt, inputs, target in run:
        merge_planned(pt, plan, inputs, target.device, seed, into=target)


def _arrived(item: tuple[Any, Any, Any, int], main) -> tuple[Any, Any]:
    """A copied-ahead tensor's inputs, once its copy is done, for use on ``main``."""
    pt, inputs, ready, _size = item
    main.wait_event(ready)
    for t in _flat(inputs):
        t.record_stream(main)  # made on the side stream, used (and freed) on this one
    return pt, inputs


def _flat(inputs) -> list[torch.Tensor]:
    tensors, base = inputs
    return [*tensors, *([base] if base is not None else [])]
