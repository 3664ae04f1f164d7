from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from evomerge.cli import main
from evomerge.fitness.data import read_jsonl
from evomerge.fitness.tasks import TrainSampler, held_out, key
from evomerge.fitness.zoo import SPLITS, TINY, ZooRecipe, build_zoo, ensure_zoo, load_zoo


def test_zoo_layout_and_manifest(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = load_zoo(tiny_zoo)
    assert set(manifest["models"]) == {"base", "cp", "rev", "sort"}
    assert manifest["recipe_hash"] == TINY.digest()
    for _name, entry in manifest["models"].items():
        path = tiny_zoo / entry["path"]
        assert (path / "model.safetensors").is_file()
        AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert tok("add:1+2=", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids("a")
        for task in manifest["tasks"]:
            assert set(entry["accuracy"][task]) == set(SPLITS)
    for entry in manifest["tasks"].values():
        cfg = yaml.safe_load((tiny_zoo / entry["lm_eval"]).read_text())
        assert cfg["dataset_path"] == "json" and cfg["output_type"] == "loglikelihood"
        assert all((tiny_zoo / entry[s]).is_file() for s in SPLITS)


def test_splits_are_disjoint_and_never_trained_on(tiny_zoo):
    manifest = load_zoo(tiny_zoo)
    seen: set[str] = set()
    for _task, entry in manifest["tasks"].items():
        for split in SPLITS:
            keys = {key(i) for i in read_jsonl(tiny_zoo / entry[split])}
            assert not keys & seen
            seen |= keys
    sampler = TrainSampler(TINY.seed, set(seen))
    for item in sampler.batch({"add": 1, "rev": 1, "sort": 1, "cp": 1}, 5000):
        assert key(item) not in seen


def test_held_out_is_deterministic():
    a = held_out("rev", 50, 3, set())
    b = held_out("rev", 50, 3, set())
    assert a == b and len({key(i) for i in a}) == 50


def _hashes(root):
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("*/model.safetensors")}


def test_build_is_deterministic_and_cached(tiny_zoo, tmp_path):
    again = tmp_path / "again"
    build_zoo(again, TINY, log=lambda _: None)
    assert _hashes(again) == _hashes(tiny_zoo)
    stamp = (again / "zoo.json").stat().st_mtime_ns
    ensure_zoo(again, TINY, log=lambda _: None)
    assert (again / "zoo.json").stat().st_mtime_ns == stamp  # up to date: not rebuilt
    changed = TINY.model_copy(update={"seed": 1})
    ensure_zoo(again, changed, log=lambda _: None)
    assert load_zoo(again)["recipe_hash"] == changed.digest()


def test_eval_cli_prints_table_and_json(tiny_zoo, tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"zoo: {tiny_zoo}\nmodels: [zoo:cp, zoo:rev]\nbase_model: zoo:base\n"
        "fitness: {tasks: [cp, rev, sort], samples: 30}\n"
    )
    assert main(["eval", str(tiny_zoo / "rev"), "--config", str(cfg), "--split", "test"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert set(result) == {"fitness", "tasks", "seconds"} and set(result["tasks"]) == {"cp", "rev", "sort"}
    assert result["fitness"] == pytest.approx(sum(result["tasks"].values()) / 3)
    assert any(line.startswith("fitness") for line in out)


def test_eval_backends_agree_on_zoo(tiny_zoo, tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"zoo: {tiny_zoo}\nmodels: [zoo:cp]\nfitness: {{tasks: [cp, rev, sort], samples: 40}}\n")
    results = []
    for backend in ("native", "lm-eval"):
        assert main(["eval", str(tiny_zoo / "base"), "--config", str(cfg), "--backend", backend]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["tasks"] == results[1]["tasks"]
    assert any(v > 0 for v in results[0]["tasks"].values())  # a real signal, not all zeros


def test_eval_bad_config_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("models: [zoo:add]\nfitness: {tasks: {add: {weight: -1}}}\n")
    assert main(["eval", str(tmp_path), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "exp.yaml" in err and "weight" in err and "\n" not in err


@pytest.mark.slow
def test_demo_zoo_builds_and_specialists_lead_their_task(demo_zoo_build):
    """The shipped demo recipe, built by `evomerge zoo` as `make demo` builds it (about
    6 minutes on one core, started at collection, beside the rest of the suite): every
    specialist gains most on its own task, and the tasks with headroom gain clearly."""
    proc, work = demo_zoo_build
    assert proc.wait(timeout=1800) == 0, (work / "build.log").read_text()[-3000:]
    manifest = load_zoo(work / "zoo")
    assert manifest["recipe_hash"] == ZooRecipe().digest()
    models, tasks = manifest["models"], list(manifest["tasks"])
    base = models["base"]["accuracy"]
    for task in tasks:
        gains = {t: models[task]["accuracy"][t]["test"] - base[t]["test"] for t in tasks}
        assert gains[task] > 0 and gains[task] == max(gains.values()), (task, gains)
        if base[task]["test"] < 0.9:  # headroom left: a clear gain
            assert gains[task] > 0.05, (task, gains)
