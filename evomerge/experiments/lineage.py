"""Family trees of merged models: where a model comes from, merges of merges included.

A model directory names its parents in, by preference:

1. ``evomerge.json``, written by ``evomerge export`` (parents with paths, content
   hashes and licences, the merge method, the experiment and trial);
2. ``mergekit_config.yml``, written by mergekit and by evomerge (every ``model:`` of
   ``models:`` or ``slices:`` and the ``base_model``; the edge is the ``merge_method``),
   or a run directory's ``best_recipe.yml`` (the run's best candidate, not exported yet);
3. the model card's front matter (``base_model``, with ``base_model_relation`` or
   ``finetune`` as the edge), as the Hugging Face Hub records fine-tunes.

A parent that resolves to a local directory (absolute, or relative to the child) is
followed in turn (a Hub cache snapshot is named by its id and commit); anything else
(a Hub id, ``org/name@revision`` as evomerge's recipes write it) is a leaf. Licences come from
``evomerge.json`` or the card's ``license:``; a merge that names none takes its
parents' licence when they all carry the same one (see ``shared_license``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.operators.hub import hub_origin, portable_ref
from evomerge.operators.outputs import front_matter, license_of, shared_license

LINEAGE_FILE = "evomerge.json"


@dataclass
class Node:
    key: str  # a resolved path, or the reference as written when it is not local
    name: str
    license: str | None = None
    local: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Edge:
    parent: str
    child: str
    method: str
    role: str = "source"  # source or base


@dataclass
class Tree:
    root: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def parents(self, key: str) -> list[Edge]:
        return [e for e in self.edges if e.child == key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "nodes": [vars(n) for n in self.nodes.values()],
            "edges": [vars(e) for e in self.edges],
        }


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def _mergekit_parents(config: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """(method, [(reference, role)]) of a mergekit config (or a mergekit-moe one: the
    base, then each expert's source)."""
    refs: list[tuple[str, str]] = []
    if isinstance(config.get("experts"), list):
        experts = [e.get("source_model") for e in config["experts"] if isinstance(e, dict)]
        found = [(str(config.get("base_model")), "base")] if config.get("base_model") else []
        return "moe", found + [(str(m), "source") for m in dict.fromkeys(experts) if m]

    def add(model: Any, role: str = "source") -> None:
        if isinstance(model, dict):
            model = model.get("model") or model.get("path")
        if model:
            ref = str(model).split("+")[0]  # a LoRA suffix is not a parent of its own
            if ref not in [r for r, _ in refs]:
                refs.append((ref, role))

    base = config.get("base_model")
    for entry in config.get("models") or []:
        add(entry.get("model") if isinstance(entry, dict) else entry)
    for piece in config.get("slices") or []:
        for source in (piece or {}).get("sources") or []:
            add(source.get("model") if isinstance(source, dict) else None)
    if base:
        add(base, "base")
        refs = [(r, "base" if r == str(base).split("+")[0] else role) for r, role in refs]
    return str(config.get("merge_method", "merge")), refs


def parents_of(model_dir: Path) -> tuple[str, list[tuple[str, str]], dict[str, Any]]:
    """(edge method, [(reference, role)], metadata) of a model directory."""
    record = model_dir / LINEAGE_FILE
    if record.is_file():
        try:
            data = json.loads(record.read_text())
        except json.JSONDecodeError as err:
            raise EvomergeError(f"{record}: not valid JSON ({err.msg})") from None
        parents = [p for p in data.get("parents", []) if isinstance(p, dict) and (p.get("path") or p.get("name"))]
        refs = [(str(p.get("path") or p.get("name")), str(p.get("role", "source"))) for p in parents]
        return str(data.get("method", "merge")), refs, data
    names = ("mergekit_config.yml", "mergekit_moe_config.yml", "best_recipe.yml")  # a model's; a run directory's
    for config in (model_dir / name for name in names):
        if not config.is_file():
            continue
        try:
            raw = yaml.safe_load(config.read_text())
        except yaml.YAMLError as err:
            raise EvomergeError(f"{config}: not valid YAML ({str(err).splitlines()[0]})") from None
        if isinstance(raw, dict):
            method, refs = _mergekit_parents(raw)
            return method, refs, {}
    card = front_matter(model_dir)
    bases = _as_list(card.get("base_model"))
    relation = str(card.get("base_model_relation") or ("merge" if len(bases) > 1 else "finetune"))
    return relation, [(b, "base" if len(bases) == 1 else "source") for b in bases], {}


def _resolve(ref: str, child: Path) -> Path | None:
    for candidate in (Path(ref), child / ref):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def build_tree(model_dir: Path, *, max_depth: int = 32) -> Tree:
    """The family tree of ``model_dir`` (its ancestors, followed through every local parent)."""
    root = model_dir.resolve()
    if not root.is_dir():
        raise EvomergeError(f"{model_dir}: no such model directory")
    tree = Tree(str(root))
    _visit(tree, root, 0, max_depth)
    return tree


def _visit(tree: Tree, path: Path, depth: int, max_depth: int) -> None:
    key = str(path)
    if key in tree.nodes:
        return
    method, refs, meta = parents_of(path)
    licence = license_of(path) or meta.get("license")
    info: dict[str, Any] = {k: meta[k] for k in ("experiment", "trial", "test_fitness") if k in meta}
    name = portable_ref(path) if hub_origin(path) else path.name  # a Hub cache snapshot: its id and commit
    tree.nodes[key] = Node(key, name, licence, True, info)
    if depth >= max_depth:
        return
    licences = {p.get("path") or p.get("name"): p.get("license") for p in meta.get("parents", [])}
    for ref, role in refs:
        local = _resolve(ref, path)
        if local is None:
            if ref not in tree.nodes:
                tree.nodes[ref] = Node(ref, ref, licences.get(ref), False)
            tree.edges.append(Edge(ref, key, method, role))
            continue
        tree.edges.append(Edge(str(local), key, method, role))
        _visit(tree, local, depth + 1, max_depth)
    if licence is None and refs:  # a merge whose card names no licence: from its parents, when they agree
        tree.nodes[key].license = shared_license({e.parent: tree.nodes[e.parent].license for e in tree.parents(key)})[0]


def render_text(tree: Tree) -> str:
    """The tree as indented text, the model first and its ancestors below it."""
    lines: list[str] = []

    def walk(key: str, prefix: str, edge: Edge | None, seen: frozenset[str]) -> None:
        node = tree.nodes[key]
        label = node.name + (f" [{node.license}]" if node.license else "")
        via = f" <-{edge.method}{'/base' if edge.role == 'base' else ''}- " if edge else ""
        lines.append(f"{prefix}{via}{label}")
        if key in seen:
            return
        for e in tree.parents(key):
            walk(e.parent, prefix + "    ", e, seen | {key})

    walk(tree.root, "", None, frozenset())
    return "\n".join(lines)


def _generations(tree: Tree) -> dict[str, int]:
    """Each node's distance from the root (its longest path, so parents sit above children)."""
    gen = {tree.root: 0}
    for _ in range(len(tree.nodes)):
        changed = False
        for e in tree.edges:
            if e.child in gen and gen.get(e.parent, -1) < gen[e.child] + 1 <= len(tree.nodes):
                gen[e.parent] = gen[e.child] + 1
                changed = True
        if not changed:
            break
    return gen


def draw(tree: Tree, out: Path) -> Path:
    """Draw the tree as a PNG: ancestors above, the model at the bottom, the merge method
    on every edge, the licence under every name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = _generations(tree)
    rows: dict[int, list[str]] = {}
    for key in sorted(tree.nodes, key=lambda k: tree.nodes[k].name):
        rows.setdefault(gen.get(key, 0), []).append(key)
    width = max(len(r) for r in rows.values())
    pos = {k: (i - (len(r) - 1) / 2, g) for g, r in rows.items() for i, k in enumerate(r)}  # one unit apart
    fig, ax = plt.subplots(figsize=(3 * (width + 1.2), max(3, 1.8 * len(rows))))
    box = {"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none"}
    for e in tree.edges:
        (x0, y0), (x1, y1) = pos[e.parent], pos[e.child]
        a, b = (x0, y0 - 0.18), (x1, y1 + 0.18)
        # an edge past a generation bends sideways (a quadratic Bezier) around the nodes between
        bend = 0.0 if abs(y0 - y1) <= 1 else -0.9 if x0 <= 0 else 0.9
        c = ((a[0] + b[0]) / 2 + bend, (a[1] + b[1]) / 2)

        def at(t: float, a=a, b=b, c=c) -> tuple[float, float]:
            return tuple((1 - t) ** 2 * p + 2 * t * (1 - t) * q + t**2 * r for p, q, r in zip(a, c, b))  # type: ignore

        curve = [at(i / 40) for i in range(41)]
        ax.plot([p[0] for p in curve], [p[1] for p in curve], color="0.4", lw=1)
        ax.annotate("", b, at(0.95), arrowprops={"arrowstyle": "->", "color": "0.4"})
        lx, ly = at(0.45 if bend else 0.5)
        label = e.method + (" (base)" if e.role == "base" else "")
        ax.text(lx, ly, label, fontsize=7, ha="center", va="center", color="tab:blue", bbox=box)
    for key, (x, y) in pos.items():
        node = tree.nodes[key]
        text = node.name + f"\n{node.license or 'licence unknown'}"
        colour = "#fde9c9" if key == tree.root else "#e8f0fb" if node.local else "#eeeeee"
        ax.text(x, y, text, ha="center", va="center", fontsize=8, bbox={"boxstyle": "round", "fc": colour})
    ax.set_xlim(-width / 2 - 0.6, width / 2 + 0.6)
    ax.set_ylim(-0.6, max(rows) + 0.6)
    ax.axis("off")
    ax.set_title(f"Family tree of {tree.nodes[tree.root].name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
