"""Model references as Hugging Face Hub ids, resolved offline through a Hub cache laid
out as huggingface_hub lays it out."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.operators.hub import HubRef, hub_origin, parse_hub_id, portable_ref, resolve_hub_id
from evomerge.testing import populate_hub_cache
from tests.cli import one_line_error, run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture()
def hub(tmp_path, family, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    populate_hub_cache(cache, "acme/base-1m", family[0], commit=COMMIT)
    populate_hub_cache(cache, "acme/tuned-1m", family[1], commit=COMMIT)
    populate_hub_cache(cache, "acme/tuned-1m", family[2], commit=OTHER, branch="v2")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    assert parse_hub_id("acme/model") == HubRef("acme/model")
    assert parse_hub_id("acme/model@v1.0") == HubRef("acme/model", "v1.0")
    assert parse_hub_id("model") is None and parse_hub_id("./acme/model") is None and parse_hub_id("/abs/x") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "model").mkdir(parents=True)
    assert parse_hub_id("acme/model") is None  # an existing local path wins


def test_ids_resolve_to_snapshots_by_branch_and_commit(hub):
    main = resolve_hub_id(HubRef("acme/tuned-1m"))
    assert hub_origin(main) == ("acme/tuned-1m", COMMIT) and (main / "config.json").is_file()
    assert hub_origin(resolve_hub_id(HubRef("acme/tuned-1m", "v2"))) == ("acme/tuned-1m", OTHER)
    assert hub_origin(resolve_hub_id(HubRef("acme/tuned-1m", OTHER))) == ("acme/tuned-1m", OTHER)
    assert portable_ref(main) == f"acme/tuned-1m@{COMMIT}"


def test_merge_recipe_with_hub_ids_records_ids_and_commits(hub, family, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": "acme/base-1m",
                "models": [
                    {"model": "acme/tuned-1m", "parameters": {"weight": 0.5}},
                    {"model": "acme/tuned-1m@v2", "parameters": {"weight": 0.5}},
                    {"model": str(family[3]), "parameters": {"weight": 0.3}},
                ],
            }
        )
    )
    out = tmp_path / "out"
    res = run_cli("merge", str(recipe), str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["acme/base-1m", "acme/tuned-1m"]  # Hub ids only, never a local path
    assert str(family[3]) not in json.dumps(front)
    assert f"(https://huggingface.co/acme/tuned-1m) at commit `{COMMIT}`" in card
    assert f"(https://huggingface.co/acme/tuned-1m) at commit `{OTHER}`" in card
    assert f"`{family[3]}` (a local model)" in card


def test_a_hub_id_not_in_the_cache_offline_is_one_line(hub, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: acme/missing\n  - model: acme/base-1m\n")
    res = run_cli("merge", str(recipe), str(tmp_path / "out"), "--quiet")
    err = one_line_error(res)
    assert "acme/missing" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()
