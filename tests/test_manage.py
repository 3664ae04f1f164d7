"""Run directories: resume, status and export, on the tiny zoo with one in-process worker."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.cli import main
from evomerge.experiments.run import RunOptions, run_experiment

from .cli import run_cli
from .search.conftest import tiny_config


@pytest.fixture
def finished_run(tiny_zoo, tmp_path, monkeypatch):
    """A finished run tracked in its own MLflow store (also the default for the CLI calls)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    cfg = tiny_config(tiny_zoo).resolved()
    out = tmp_path / "run"
    run_experiment(cfg, out, RunOptions(quiet=True, in_process=True))
    return out


def test_export_reproduces_the_recorded_fitness_and_registers_the_model(finished_run, tmp_path, capsys):
    summary = json.loads((finished_run / "summary.json").read_text())
    out = tmp_path / "exported"
    assert main(["export", str(finished_run), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "trial" in card and "mergekit" in card and (out / "mergekit_config.yml").is_file()
    assert f"Test fitness: **{summary['best_test_fitness']:.4f}**" in card
    record = json.loads((out / "evomerge.json").read_text())
    assert record["trial"] == summary["best_trial"] and record["test_fitness"] == summary["best_test_fitness"]
    assert sorted(p["name"] for p in record["parents"]) == ["base", "cp", "rev", "sort"]
    assert all(p["license"] == "apache-2.0" and len(p["hash"]) == 16 for p in record["parents"])
    assert len({p["hash"] for p in record["parents"]}) == 4  # content fingerprints tell the models apart
    assert record["registered"] == {"name": "tiny", "version": "1"}
    capsys.readouterr()
    assert main(["eval", str(out), "--config", str(finished_run / "config.yaml"), "--split", "search"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fitness"] == summary["best_fitness"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    version = client.get_model_version("tiny", "1")
    assert version.source == str(out.resolve())
    assert version.tags["trial"] == str(summary["best_trial"]) and version.tags["evomerge.kind"] == "merge"
    assert {p["name"] for p in json.loads(version.tags["lineage"])} == {"base", "cp", "rev", "sort"}
    linked = client.get_run(version.run_id).data.tags
    assert linked["trial"] == str(summary["best_trial"]) and linked["evomerge.best"] == "true"  # the marked run
    parent = client.get_run(linked["mlflow.parentRunId"]).data.tags["mlflow.note.content"]
    assert f"Exported to `{out.resolve()}` (registered model `tiny`, version 1)." in parent  # where the export is
    assert "Not exported yet" not in parent


def test_export_of_another_trial_measures_its_test_fitness(finished_run, tmp_path):
    """Also: the run records the dtype its workers merged in (bfloat16 on GPUs), and an
    export made elsewhere (here a machine without GPUs) merges in that dtype."""
    import optuna
    from safetensors import safe_open

    from evomerge.experiments.config import load_config
    from evomerge.fitness.scoring import evaluate_model_dir

    summary = json.loads((finished_run / "summary.json").read_text())
    other = next(n for n in range(6) if n != summary["best_trial"])
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{finished_run / 'study.db'}")
    assert study.user_attrs["dtype"] == "float32"  # this CPU search's
    study.set_user_attr("dtype", "bfloat16")  # as a search on GPU workers records it
    out = tmp_path / "other"
    assert main(["export", str(finished_run), str(out), "--trial", str(other), "--no-register"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert "dtype: bfloat16" in (out / "mergekit_config.yml").read_text()
    record = json.loads((out / "evomerge.json").read_text())
    measured = evaluate_model_dir(out, load_config(finished_run / "config.yaml"), split="test")
    assert record["trial"] == other and record["test_fitness"] == measured.fitness
    assert record["test_tasks"] == measured.tasks and "registered" not in record


def test_lineage_of_an_export_reaches_the_base_through_the_specialists(finished_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(finished_run), str(out)]) == 0
    png = tmp_path / "tree.png"
    capsys.readouterr()
    assert main(["lineage", str(out), "--out", str(png)]) == 0
    text = capsys.readouterr().out
    # every source declares apache-2.0, so the export does too: in its card, and so in the tree
    assert text.splitlines()[0] == "exported [apache-2.0]" and "<-task_arithmetic- cp [apache-2.0]" in text
    card = (out / "README.md").read_text()
    assert "\nlicense: apache-2.0\n" in card.split("---")[1] and "the licence every source model declares" in card
    assert "http" not in card  # no made-up links
    assert "<-finetune/base- base [apache-2.0]" in text  # a specialist's own parent, from its model card
    assert png.stat().st_size > 10_000
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = client.get_model_version("tiny", "1").run_id  # the trial's child run holds the tree
    assert {a.path for a in client.list_artifacts(run_id, "lineage")} == {"lineage/tree.json", "lineage/tree.png"}


def test_lineage_follows_merges_of_merges_written_by_mergekit(tiny_zoo, tmp_path, capsys):
    from evomerge.experiments.lineage import build_tree
    from evomerge.operators.engine import run_merge
    from evomerge.operators.recipe import Recipe

    def merge(out, models, method="linear"):
        data = {"merge_method": method, "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
        run_merge(Recipe.from_dict(data, "test"), out)
        return out

    first = merge(tmp_path / "first", [tiny_zoo / "cp", tiny_zoo / "rev"])
    second = merge(tmp_path / "second", [first, tiny_zoo / "sort"])
    (second / "README.md").write_text("no front matter")  # mergekit_config.yml alone must do
    tree = build_tree(second)
    edges = {(tree.nodes[e.parent].name, tree.nodes[e.child].name, e.method) for e in tree.edges}
    assert ("first", "second", "linear") in edges and ("cp", "first", "linear") in edges
    assert ("base", "sort", "finetune") in edges and len(tree.nodes) == 6
    assert tree.nodes[str(second.resolve())].license == "apache-2.0"  # no card licence: its parents' shared one
    assert main(["lineage", str(tmp_path / "nope"), "--no-log"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_lineage_of_a_mixture_of_experts_reaches_its_base_and_experts(tiny_zoo, tmp_path):
    from evomerge.experiments.lineage import build_tree
    from evomerge.operators.moe import run_moe
    from evomerge.operators.moe_config import MoEConfig

    experts = [{"source_model": str(tiny_zoo / m)} for m in ("cp", "rev")]
    cfg = MoEConfig.model_validate({"base_model": str(tiny_zoo / "base"), "gate_mode": "random", "experts": experts})
    out = run_moe(cfg, tmp_path / "mixture").out_dir
    tree = build_tree(out)
    edges = {(tree.nodes[e.parent].name, tree.nodes[e.child].name, e.method) for e in tree.edges}
    assert {("base", "mixture", "moe"), ("cp", "mixture", "moe"), ("rev", "mixture", "moe")} <= edges


def test_a_merge_of_differently_licensed_models_derives_no_licence(tiny_zoo, tmp_path):
    import shutil

    from evomerge.experiments.lineage import build_tree
    from evomerge.operators.engine import run_merge
    from evomerge.operators.outputs import front_matter
    from evomerge.operators.recipe import Recipe

    other = shutil.copytree(tiny_zoo / "rev", tmp_path / "rev-mit")
    card = (other / "README.md").read_text().replace("license: apache-2.0", "license: mit")
    (other / "README.md").write_text(card)
    data = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in
            (tiny_zoo / "cp", other)]}  # fmt: skip
    out = tmp_path / "merged"
    run_merge(Recipe.from_dict(data, "test"), out)
    assert "license" not in front_matter(out)
    text = (out / "README.md").read_text()
    assert "Licence: not derived: the source models declare different licences" in text and ": mit" in text
    assert build_tree(out).nodes[str(out.resolve())].license is None


def test_leaderboard_ranks_exports_and_sources_by_test_fitness(finished_run, tmp_path, capsys):
    assert main(["export", str(finished_run), str(tmp_path / "exported")]) == 0
    summary = json.loads((finished_run / "summary.json").read_text())
    board = tmp_path / "board.md"
    capsys.readouterr()
    assert main(["leaderboard", "--out", str(board)]) == 0
    text = board.read_text()
    assert text.strip() in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 5 and "## Tasks: cp, rev, sort" in text  # the export and the four source models
    scores = [float(r.split("|")[5]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    merged = next(r for r in rows if "| merge |" in r)
    assert f"{summary['best_test_fitness']:.4f}" in merged and "tiny v1" in merged
    assert {r.split("|")[2].strip() for r in rows if "| source |" in r} == {"base", "cp", "rev", "sort"}


def test_status_lists_the_top_trials(finished_run, capsys):
    assert main(["status", str(finished_run), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "6/6 trials" in out and "complete 6" in out and "finished: best trial" in out


def test_resume_refuses_a_changed_config_and_shows_the_difference(finished_run):
    cfg_path = finished_run / "config.yaml"
    original = cfg_path.read_text()
    data = yaml.safe_load(original)
    data["search"]["trials"] = 8
    cfg_path.write_text(yaml.safe_dump(data))
    try:
        res = run_cli("resume", str(finished_run), "--quiet")  # as the user sees it: a separate process
    finally:
        cfg_path.write_text(original)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "changed since the run started" in res.stderr and "trials: 8" in res.stderr


def test_export_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_pareto_search_draws_its_front(tiny_zoo, tmp_path):
    cfg = tiny_config(tiny_zoo, search__sampler="nsgaii", search__trials=8).model_dump()
    cfg["fitness"]["aggregate"] = "pareto"
    from evomerge.experiments.config import ExperimentConfig

    out = tmp_path / "run"
    summary = run_experiment(
        ExperimentConfig.model_validate(cfg).resolved(), out, RunOptions(quiet=True, in_process=True, track=False)
    )
    assert summary["reports"] == ["history.png", "importance.png", "pareto_front.png"]
    assert all((out / "reports" / name).stat().st_size > 10_000 for name in summary["reports"])
    assert summary["pareto_front"]


def test_the_run_log_records_every_session_and_trial(finished_run):
    lines = (finished_run / "run.log").read_text().splitlines()
    assert "session start (run; 1 worker(s), budget 6)" in lines[0]
    assert len([line for line in lines if " COMPLETE fitness " in line]) == 6
    assert "session end: best trial" in lines[-1]
    assert main(["resume", str(finished_run), "--quiet"]) == 0  # the budget is met: a session with no trial
    again = (finished_run / "run.log").read_text().splitlines()
    assert again[: len(lines)] == lines and "session start (resume" in again[len(lines)]


def test_a_search_over_hub_ids_exports_ids_and_commits(tiny_zoo, tmp_path, monkeypatch, capsys):
    """Sources named by Hub id (offline, from a Hub cache): the run records the ids, the
    export's recipe names them at their commits (mergekit resolves those too), its card's
    front matter lists them, and lineage names them with their commits."""
    from evomerge.testing import populate_hub_cache

    commit = "c0ffee" * 6 + "c0ff"
    for name in ("base", "cp", "rev"):
        populate_hub_cache(tmp_path / "hf" / "hub", f"zoo/{name}", tiny_zoo / name, commit=commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    cfg = tiny_config(
        tiny_zoo, models=["zoo/cp", f"zoo/rev@{commit}"], base_model="zoo/base", search__trials=3
    ).resolved()
    assert cfg.models == ["zoo/cp", f"zoo/rev@{commit}"]  # a Hub id stays one in the run's record
    run_experiment(cfg, tmp_path / "run", RunOptions(quiet=True, in_process=True))
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), str(out), "--no-register"]) == 0
    recipe = (out / "mergekit_config.yml").read_text()
    assert f"zoo/cp@{commit}" in recipe and f"zoo/base@{commit}" in recipe and str(tmp_path) not in recipe
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert sorted(front["base_model"]) == ["zoo/base", "zoo/cp", "zoo/rev"]
    parents = json.loads((out / "evomerge.json").read_text())["parents"]
    assert {(p["hub_id"], p["revision"]) for p in parents} == {(f"zoo/{n}", commit) for n in ("base", "cp", "rev")}
    capsys.readouterr()
    assert main(["lineage", str(out)]) == 0
    assert f"zoo/cp@{commit}" in capsys.readouterr().out

