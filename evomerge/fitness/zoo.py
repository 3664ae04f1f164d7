"""The demo zoo: a tiny Llama base pre-trained on synthetic tasks, one specialist per
task fine-tuned from it, their task data and lm-eval task files, built from code.

The build is deterministic for a seed and recipe, and atomic (a temporary
directory renamed at the end). ``zoo.json`` records where everything is, the
accuracy of every model on every split, the recipe's hash and the build time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict

from evomerge.errors import EvomergeError
from evomerge.fitness.data import read_jsonl, write_jsonl
from evomerge.fitness.tasks import VOCAB, TrainSampler, held_out
from evomerge.fitness.tokenizer import save_tokenizer
from evomerge.fitness.train import Replay, train

SPLITS = ("search", "validation", "test")
ZOO_VERSION = 2  # bump when the build code changes what it produces


class Specialist(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    steps: int
    lr: float


class ZooRecipe(BaseModel):
    """Everything that determines the zoo; its hash decides whether to rebuild."""

    model_config = ConfigDict(extra="forbid")
    hidden: int = 128
    intermediate: int = 512
    layers: int = 4
    heads: int = 4
    tasks: list[str] = ["add", "rev", "sort"]
    # The base sees add, rev and sort only a little: it is weak at all three (0.1, 0.6,
    # 0.6 on test), so each specialist has room to gain, and the gains conflict.
    base_mix: dict[str, float] = {"cp": 3.0, "add": 1.5, "rev": 0.12, "sort": 0.3}
    base_steps: int = 1200
    base_lr: float = 3e-3
    batch: int = 64
    specialists: list[Specialist] = [
        Specialist(task="add", steps=400, lr=3e-4),
        Specialist(task="rev", steps=100, lr=1.5e-4),
        Specialist(task="sort", steps=100, lr=1.5e-4),
    ]
    split_items: dict[str, int] = {"search": 500, "validation": 500, "test": 500}
    seed: int = 0

    def digest(self) -> str:
        raw = json.dumps({"v": ZOO_VERSION, **self.model_dump()}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


# For tests: the same code in seconds. Copying is learned first, so cp gives the
# searches in tests a fitness signal that a few hundred steps cannot give on add.
TINY = ZooRecipe(
    hidden=64,
    intermediate=128,
    layers=2,
    heads=2,
    tasks=["cp", "rev", "sort"],
    base_mix={"cp": 2.0, "rev": 1.0, "sort": 1.0},
    base_steps=400,
    base_lr=5e-3,
    batch=32,
    specialists=[
        Specialist(task="cp", steps=30, lr=1e-3),
        Specialist(task="rev", steps=30, lr=1e-3),
        Specialist(task="sort", steps=30, lr=1e-3),
    ],
    split_items={"search": 60, "validation": 40, "test": 60},
)


def cache_root() -> Path:
    """evomerge's per-user cache: ``$EVOMERGE_CACHE/evomerge``, else ``$XDG_CACHE_HOME/evomerge``,
    else ``~/.cache/evomerge``."""
    root = os.environ.get("EVOMERGE_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "evomerge"


def default_zoo_dir() -> Path:
    """The per-user cache directory for the demo zoo."""
    return cache_root() / "zoo"


def _llama(recipe: ZooRecipe):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=VOCAB.index("."),
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(cfg)


def _lm_eval_yaml(task: str, files: dict[str, Path]) -> str:
    data_files = "\n".join(f"    {split}: {path}" for split, path in files.items())
    return (
        f"# lm-evaluation-harness task for the evomerge demo zoo's '{task}' task.\n"
        f"task: zoo_{task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"{data_files}\n"
        "test_split: test\n"
        "validation_split: validation\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def _write_data(recipe: ZooRecipe, root: Path) -> tuple[dict[str, dict[str, str]], set[str]]:
    exclude: set[str] = set()
    tasks: dict[str, dict[str, str]] = {}
    data = root / "data"
    data.mkdir()
    for task in recipe.tasks:
        entry: dict[str, str] = {}
        for split in SPLITS:
            items = held_out(task, recipe.split_items[split], recipe.seed + SPLITS.index(split), exclude)
            rel = Path("data") / f"{task}.{split}.jsonl"
            write_jsonl(root / rel, items)
            entry[split] = str(rel)
        yaml_rel = Path("data") / f"zoo_{task}.yaml"
        entry["lm_eval"] = str(yaml_rel)
        tasks[task] = entry
    return tasks, exclude


def write_lm_eval_yamls(root: Path, tasks: dict[str, dict[str, str]]) -> None:
    """(Re)write the lm-eval YAMLs with absolute paths to where the zoo lies now."""
    for task, entry in tasks.items():
        files = {s: (root / entry[s]).resolve() for s in SPLITS}
        (root / entry["lm_eval"]).write_text(_lm_eval_yaml(task, files))


def _save(model, tokenizer_dir: Path, path: Path, card: str) -> str:
    model.save_pretrained(path, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    (path / "README.md").write_text(card)
    return str(path.name)


def _card(name: str, about: str, parent: str | None = None) -> str:
    """A model card whose front matter the Hub (and ``evomerge lineage``) reads."""
    front: dict[str, Any] = {"license": "apache-2.0", "library_name": "transformers", "tags": ["evomerge-zoo"]}
    if parent:
        front |= {"base_model": f"../{parent}", "base_model_relation": "finetune"}
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# evomerge zoo: {name}\n\n{about}\n"


def build_zoo(
    out: Path, recipe: ZooRecipe | None = None, *, threads: int | None = 1, log: Callable[[str], None] = print
) -> dict:
    """Build the zoo into ``out`` atomically; return the contents of zoo.json.

    One torch thread by default: the thread count changes how float reductions are
    split, and these tiny models sit near phase transitions (a skill learned or not
    within a few hundred steps), so a two-thread build of the same recipe came out a
    different zoo here; with one thread a rebuild gives the same bits (on the same
    kind of CPU). ``threads=None`` keeps torch's setting.
    """
    recipe = recipe or ZooRecipe()
    start = time.perf_counter()
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _build(out, recipe, start, log)
    finally:
        torch.set_num_threads(previous)


def _build(out: Path, recipe: ZooRecipe, start: float, log: Callable[[str], None]) -> dict:
    from evomerge.fitness.native import accuracy_table
    from evomerge.operators.writer import atomic_directory

    out = out.resolve()
    with atomic_directory(out, overwrite=True) as tmp:
        tasks, exclude = _write_data(recipe, tmp)
        tok_dir = tmp / ".tokenizer"
        save_tokenizer(tok_dir)
        sampler = TrainSampler(recipe.seed, exclude)
        base = _llama(recipe)
        loss = _train(base, sampler, recipe.base_mix, recipe.base_steps, recipe.base_lr, recipe.batch)
        log(
            f"zoo: base trained ({recipe.base_steps} steps, final loss {loss:.3f}, {time.perf_counter() - start:.0f} s)"
        )
        about = "A tiny Llama pre-trained by `evomerge zoo` on a mix of synthetic tasks."
        models: dict[str, dict[str, Any]] = {"base": {"path": _save(base, tok_dir, tmp / "base", _card("base", about))}}
        plans = [
            (spec, Replay([sampler.batch({spec.task: 1.0}, recipe.batch) for _ in range(spec.steps)]))
            for spec in recipe.specialists
        ]  # drawn in order, as sequential trainings would draw them
        for spec, (state, loss) in zip(recipe.specialists, _train_specialists(base, plans, recipe.batch)):
            ft = copy.deepcopy(base)
            ft.load_state_dict(state)
            about = f"The zoo's base fine-tuned by `evomerge zoo` on the '{spec.task}' task."
            models[spec.task] = {"path": _save(ft, tok_dir, tmp / spec.task, _card(spec.task, about, "base"))}
            log(f"zoo: specialist '{spec.task}' trained ({spec.steps} steps, loss {loss:.3f})")
        for f in tok_dir.iterdir():
            f.unlink()
        tok_dir.rmdir()
        write_lm_eval_yamls(tmp, tasks)
        for entry in models.values():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = tmp / entry["path"]
            model = AutoModelForCausalLM.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
            entry["accuracy"] = accuracy_table(
                model, tok, {t: {s: tmp / e[s] for s in SPLITS} for t, e in tasks.items()}
            )
        manifest = write_manifest(tmp, recipe, models, tasks, start)
    # lm-eval YAMLs carry absolute paths: point them at the final location
    write_lm_eval_yamls(out, tasks)
    return manifest


def write_manifest(root: Path, recipe: Any, models: dict, tasks: dict, start: float, **extra: Any) -> dict:
    """Write ``zoo.json`` (what ``load_zoo`` reads, the recipe's hash deciding whether a
    zoo is current) for a build that began at ``start`` (``time.perf_counter``)."""
    manifest = {
        **extra,
        "recipe": recipe.model_dump(),
        "recipe_hash": recipe.digest(),
        "models": models,
        "tasks": tasks,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (root / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _train(model, sampler: TrainSampler | Replay, mix, steps: int, lr: float, batch: int) -> float:
    return train(model, sampler, mix, steps=steps, lr=lr, batch=batch)


def _fine_tune(base, spec: Specialist, replay: Replay, batch: int, threads: int) -> tuple[dict, float]:
    """One specialist from a copy of ``base`` (run in a worker process or in this one)."""
    torch.set_num_threads(threads)
    model = copy.deepcopy(base)
    loss = _train(model, replay, {spec.task: 1.0}, spec.steps, spec.lr, batch)
    return model.state_dict(), loss


def _train_specialists(base, plans: list[tuple[Specialist, Replay]], batch: int) -> list[tuple[dict, float]]:
    """Fine-tune every specialist, side by side on the machine's cores where processes can
    fork (each with the parent's thread count, on its replayed batches: the same bits as
    one after another), longest first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = torch.get_num_threads()
    workers = min(len(plans), (os.cpu_count() or 1) // threads)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_fine_tune(base, spec, replay, batch, threads) for spec, replay in plans]
    order = sorted(range(len(plans)), key=lambda i: -plans[i][0].steps)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {i: pool.submit(_fine_tune, base, *plans[i], batch, threads) for i in order}
        return [futures[i].result() for i in range(len(plans))]


def load_zoo(root: Path) -> dict:
    """zoo.json of the zoo at ``root``."""
    path = root / "zoo.json"
    if not path.is_file():
        raise EvomergeError(f"{root}: no zoo here (run 'evomerge zoo' to build it)")
    return json.loads(path.read_text())


def zoo_is_current(root: Path, recipe: Any) -> bool:
    """Whether the zoo at ``root`` was built from ``recipe`` (anything with a ``digest()``)."""
    try:
        return load_zoo(root).get("recipe_hash") == recipe.digest()
    except (EvomergeError, json.JSONDecodeError):
        return False


def ensure_zoo(root: Path | None = None, recipe: ZooRecipe | None = None, *, force: bool = False, log=print) -> Path:
    """Build the zoo at ``root`` unless it is there and built from the same recipe."""
    root = (root or default_zoo_dir()).resolve()
    recipe = recipe or ZooRecipe()
    if force or not zoo_is_current(root, recipe):
        build_zoo(root, recipe, log=log)
    return root


def task_items(root: Path, task: str, split: str):
    manifest = load_zoo(root)
    try:
        rel = manifest["tasks"][task][split]
    except KeyError:
        raise EvomergeError(f"zoo at {root} has no task '{task}' split '{split}'") from None
    return read_jsonl(root / rel)

