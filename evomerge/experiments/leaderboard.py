"""A leaderboard of an MLflow store: every exported merge (registered model versions
tagged ``evomerge.kind=merge``) and every source model an experiment scored (child runs
tagged ``evomerge.kind=source``), ranked by test fitness with a column per task.

Scores are comparable only on the same tasks, so there is one table per task set.
A source model appears once per experiment (its hash and the experiment identify it).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Entry:
    name: str
    kind: str  # merge or source
    experiment: str
    tasks: tuple[str, ...]
    test_fitness: float
    per_task: dict[str, float] = field(default_factory=dict)
    where: str = ""


def collect(uri: str) -> list[Entry]:
    """Every ranked model of the store at ``uri``."""
    from evomerge.experiments.tracking import open_client

    client = open_client(uri)
    entries: list[Entry] = []
    for mv in client.search_model_versions(max_results=100_000):
        tags = mv.tags or {}
        if tags.get("evomerge.kind") != "merge" or "test_fitness" not in tags:
            continue
        tasks = tuple(t for t in tags.get("tasks", "").split(",") if t)
        entries.append(
            Entry(
                f"{mv.name} v{mv.version}",
                "merge",
                tags.get("experiment", mv.name),
                tasks,
                float(tags["test_fitness"]),
                {t: float(tags[f"test.acc.{t}"]) for t in tasks if f"test.acc.{t}" in tags},
                mv.source or "",
            )
        )
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    seen: set[tuple[str, str, str]] = set()
    if experiments:
        runs = client.search_runs(
            list(experiments), filter_string="tags.`evomerge.kind` = 'source'", max_results=50_000
        )  # newest first
        for r in runs:
            tags, metrics = r.data.tags, r.data.metrics
            key = (tags.get("hash", ""), experiments[r.info.experiment_id], tags.get("tasks", ""))
            if key in seen or "test_fitness" not in metrics:
                continue
            seen.add(key)
            tasks = tuple(t for t in tags.get("tasks", "").split(",") if t)
            per_task = {t: metrics[f"test.acc.{t}"] for t in tasks if f"test.acc.{t}" in metrics}
            entries.append(
                Entry(tags.get("model", "?"), "source", key[1], tasks, metrics["test_fitness"], per_task, key[0])
            )
    return entries


def render(entries: list[Entry]) -> str:
    """Markdown: one ranked table per task set."""
    if not entries:
        return "No exported merges or scored source models in this store yet.\n"
    groups: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries:
        groups.setdefault(tuple(sorted(e.tasks)), []).append(e)
    out = ["# evomerge leaderboard", ""]
    for tasks, group in sorted(groups.items()):
        group.sort(key=lambda e: -e.test_fitness)
        out += [f"## Tasks: {', '.join(tasks) or '(unknown)'}", ""]
        out.append("| rank | model | kind | experiment | test fitness | " + " | ".join(tasks) + " |")
        out.append("|---" * (5 + len(tasks)) + "|")
        for rank, e in enumerate(group, 1):
            cells = [f"{e.per_task[t]:.4f}" if t in e.per_task else "" for t in tasks]
            row = [str(rank), e.name, e.kind, e.experiment, f"{e.test_fitness:.4f}", *cells]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)
