"""The native scorer agrees with greedy generate() and with lm-eval, sample by sample."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from evomerge.fitness.data import write_jsonl
from evomerge.fitness.lmeval import LmEvalScorer, LmEvalTask
from evomerge.fitness.native import encode, score, shared_prefix
from evomerge.fitness.tasks import VOCAB, Item
from evomerge.fitness.tokenizer import build_tokenizer
from evomerge.fitness.zoo import TINY, _llama, _lm_eval_yaml

CHARS = VOCAB[2:]


def _items(model, tok, *, head: str = "", count: int = 80, seed: int = 0) -> list[Item]:
    """Items whose answers are half the model's own greedy output, half not."""
    rng = random.Random(seed)
    items: list[Item] = []
    while len(items) < count:
        prompt = head + "".join(rng.choice(CHARS) for _ in range(rng.randint(3, 8)))
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        n = rng.randint(1, 3)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        new = out[0, ids.shape[1] :].tolist()
        if any(t < 2 for t in new):  # a special token: no text answer to compare
            continue
        answer = "".join(VOCAB[t] for t in new)
        if len(items) % 2:
            wrong = rng.choice([c for c in CHARS if c != answer[-1]])
            answer = answer[:-1] + wrong
        items.append(Item(prompt, answer))
    return items


@pytest.fixture(scope="module")
def model_and_items():
    """A random tiny model with decisive logits, and items of random prompts."""
    tok = build_tokenizer()
    model = _llama(TINY.model_copy(update={"seed": 3})).eval()
    with torch.no_grad():  # decisive logits: a random init has near-ties that rounding can flip
        model.lm_head.weight.mul_(200.0)
    return model, tok, _items(model, tok)


def _generate_hits(model, tok, items):
    hits = []
    for item in items:
        ids = torch.tensor([tok(item.prompt, add_special_tokens=False)["input_ids"]])
        n = len(tok(item.answer, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        hits.append(tok.decode(out[0, ids.shape[1] :]) == item.answer)
    return hits


def test_native_matches_generate(model_and_items):
    model, tok, items = model_and_items
    native = score(model, encode(tok, items), batch_size=16).tolist()
    assert native == _generate_hits(model, tok, items)
    assert 0 < sum(native) < len(native)


def test_shared_prefix_runs_once_and_scores_the_same(model_and_items):
    model, tok, _ = model_and_items
    items = _items(model, tok, head="sort:xyz,", count=40, seed=1)
    enc = encode(tok, items)
    assert shared_prefix(enc) == len("sort:xyz,")
    assert shared_prefix(enc.subset([0])) == len(tok(items[0].prompt)["input_ids"]) - 1
    n_prefix = shared_prefix(enc)
    calls: list[tuple[int, int]] = []  # (rows, positions) of every forward pass through the layers
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape)))
    try:
        shared = score(model, enc, batch_size=16).tolist()
        with_prefix, calls[:] = list(calls), []
        model.config.use_cache = False  # no KV cache: every item runs in full
        try:
            full = score(model, enc, batch_size=16).tolist()
        finally:
            model.config.use_cache = True
        without, calls[:] = list(calls), []
    finally:
        hook.remove()
    assert shared == full == _generate_hits(model, tok, items)
    assert 0 < sum(shared) < len(shared)
    # the prefix runs once, as one row of its own; the 3 batches of 16, 16 and 8 items skip it
    assert with_prefix[0] == (1, n_prefix) and [rows for rows, _ in with_prefix[1:]] == [16, 16, 8]
    assert [rows for rows, _ in without] == [16, 16, 8]
    for (_, cut), (_, whole) in zip(with_prefix[1:], without):
        assert cut == whole - n_prefix


@pytest.mark.slow
def test_native_matches_lm_eval_per_sample(model_and_items, tmp_path):
    model, tok, items = model_and_items
    files = {}
    for split in ("search", "validation", "test"):
        files[split] = tmp_path / f"t.{split}.jsonl"
        write_jsonl(files[split], items)
    yaml_path = tmp_path / "zoo_t.yaml"
    yaml_path.write_text(_lm_eval_yaml("t", files))
    native = score(model, encode(tok, items)).tolist()
    order = list(range(len(items)))
    random.Random(1).shuffle(order)
    pick = order[:50]
    lm = LmEvalScorer(model, tok, batch_size=32).score({"t": LmEvalTask(str(yaml_path))}, "test", {"t": pick})
    assert [v >= 0.5 for v in lm["t"]] == [native[i] for i in pick]


def test_an_evaluator_reads_the_files_shipped_to_its_node(tiny_zoo, tmp_path):
    """Everything a fitness reads, shipped and mirrored on a node that lacks the driver's
    directories, gives the same items (a zoo's tasks; JSONL data; an lm-eval YAML task
    with its folder and its relative and absolute data files)."""
    import shutil

    import yaml

    from evomerge.fitness.evaluate import Evaluator, FitnessConfig, fitness_files
    from evomerge.fitness.lmeval import LmEvalTask, _task_config
    from evomerge.shipping import Files, mirrored

    zoo = tmp_path / "driver" / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    data = tmp_path / "driver" / "cfg" / "data"
    data.mkdir(parents=True)
    shutil.copy(zoo / "data" / "cp.search.jsonl", data / "mine.jsonl")
    (data / "task.yaml").write_text(yaml.safe_dump({
        "task": "mine", "dataset_path": "json", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"search": "mine.jsonl", "test": str(zoo / "data" / "cp.test.jsonl")}},
    }))  # fmt: skip
    (data / "other.yaml").write_text("task: other\n")
    cfg = FitnessConfig.model_validate(
        {"tasks": {"cp": {}, "rev": {}, "mine": {"data": {"search": "data/mine.jsonl"}}}, "samples": 10}
    )
    base = tmp_path / "driver" / "cfg"
    wanted = fitness_files(cfg, zoo_root=zoo, base_dir=base)
    assert zoo / "zoo.json" in wanted and zoo / "data" / "cp.validation.jsonl" in wanted
    assert data / "mine.jsonl" in wanted and not any(p.suffix == ".safetensors" for p in wanted)
    lm = FitnessConfig.model_validate({"tasks": {"mine": {"lm_eval": "data/task.yaml"}}, "backend": "lm-eval"})
    lm_files = fitness_files(lm, zoo_root=None, base_dir=base)
    assert {data / "task.yaml", data / "other.yaml", data / "mine.jsonl", zoo / "data" / "cp.test.jsonl"} <= set(
        lm_files
    )

    before = Evaluator(cfg, zoo_root=zoo, base_dir=base, seed=1)
    root = Files.read(wanted + lm_files).materialize(tmp_path / "node")
    shutil.rmtree(tmp_path / "driver")
    after = Evaluator(cfg, zoo_root=zoo, base_dir=base, seed=1, files_root=root)
    assert after.items == before.items and after.order == before.order
    shipped = _task_config(LmEvalTask(str(mirrored(root, data / "task.yaml")), files_root=root), "search")
    files = shipped["dataset_kwargs"]["data_files"]
    assert all(str(f).startswith(str(root)) and Path(f).is_file() for f in files.values()), files


@pytest.mark.parametrize("backend", ["native", "lm-eval"])
def test_scoring_chosen_items_gives_their_full_run_results(tiny_zoo, backend):
    """An estimator's anchors (positions in a task's sample order, any order), scored
    alone, give the per-sample results that a full scoring gives at those positions;
    ``fraction`` takes the first part of them and ``prior`` is not scored again."""
    from transformers import AutoModelForCausalLM

    from evomerge.fitness.evaluate import Evaluator, FitnessConfig
    from evomerge.fitness.scoring import load_tokenizer

    cfg = FitnessConfig.model_validate({"tasks": ["cp", "rev"], "samples": 30, "backend": backend})
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo / "rev").eval()
    tok = load_tokenizer(tiny_zoo / "rev")
    ev = Evaluator(cfg, zoo_root=tiny_zoo, seed=3)
    full = ev.evaluate(model, tok)
    items = {"cp": [17, 2, 29, 8], "rev": [0, 11, 5, 23]}
    part = ev.evaluate(model, tok, items=items)
    assert part.per_sample == {n: [full.per_sample[n][p] for p in pos] for n, pos in items.items()}
    half = ev.evaluate(model, tok, items=items, fraction=0.5)
    assert half.per_sample == {n: v[:2] for n, v in part.per_sample.items()}
    rest = ev.evaluate(model, tok, items=items, prior=half.per_sample)
    assert rest.per_sample == part.per_sample and rest.samples == 4
