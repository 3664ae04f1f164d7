"""The files beside the weights: config, tokenizer, model card, recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.operators.checkpoint import Checkpoint
from evomerge.operators.hub import hub_origin, parse_hub_id
from evomerge.operators.plan import MergePlan
from evomerge.operators.writer import write_text

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def merged_config(plan: MergePlan, ckpts: dict[str, Checkpoint]) -> dict[str, Any]:
    """The config of the config model, with the new depth and dtype.

    Per-layer list fields (such as ``layer_types``) are rebuilt from the layer each
    output layer came from.
    """
    cfg = json.loads(json.dumps(ckpts[plan.config_model].config))
    old = plan.source_layers
    if old is not None and plan.num_layers != old:
        for key, value in list(cfg.items()):
            if isinstance(value, list) and len(value) == old:
                cfg[key] = [ckpts[m].config.get(key, value)[i] for m, i in plan.layer_origin]
    if "num_hidden_layers" in cfg or "n_layer" not in cfg:
        cfg["num_hidden_layers"] = plan.num_layers
    else:
        cfg["n_layer"] = plan.num_layers
    dtypes = {t.dtype for t in plan.tensors if t.dtype.is_floating_point}
    if len(dtypes) == 1:
        name = DTYPE_CONFIG_NAMES.get(next(iter(dtypes)))
        if name:
            cfg["dtype"] = name
            cfg.pop("torch_dtype", None)
    vocab = {t.vocab_rows for t in plan.tensors if t.vocab_rows}
    if vocab:
        cfg["vocab_size"] = vocab.pop()
    return cfg


def _chat_template(value: str) -> str | None:
    """The template text for a recipe's (validated) ``chat_template``; None keeps the source's."""
    return None if value == "auto" else CHATML if value == "chatml" else value


def front_matter(model_dir: Path) -> dict[str, Any]:
    """The YAML front matter of ``model_dir/README.md`` ({} when there is none or it is unreadable)."""
    card = model_dir / "README.md"
    if not card.is_file():
        return {}
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def license_of(model_dir: Path) -> str | None:
    """The licence a model card declares (its front matter's ``license:``), if any."""
    value = front_matter(model_dir).get("license")
    return str(value) if value else None


def shared_license(licences: dict[str, str | None]) -> tuple[str | None, str]:
    """The licence of a merge of models with these licences, and a sentence saying why.

    A merge contains every source's weights, so it can carry a licence only when all
    of them carry the same one; otherwise none is derived and the sentence names the
    sources' licences (or the ones that declare none) for the user to reconcile."""
    known = {v for v in licences.values() if v}
    unknown = sorted(name for name, v in licences.items() if not v)
    if len(known) == 1 and not unknown:
        lic = known.pop()
        return lic, f"Licence: {lic}, the licence every source model declares."
    if unknown:
        return None, "Licence: not derived: " + ", ".join(f"`{n}`" for n in unknown) + " declare(s) none."
    listed = "; ".join(f"`{n}`: {v}" for n, v in sorted(licences.items()))
    return None, f"Licence: not derived: the source models declare different licences ({listed})."


def card_sources(
    sources: list[str], paths: dict[str, Path] | None, lic: str | None, tags: tuple[str, ...] = ()
) -> tuple[list[str], dict[str, Any]]:
    """A card's list of source models (Markdown lines) and its front matter: Hub ids only
    in ``base_model`` (the Hub refuses anything else), from a source named by a Hub id or
    read from a Hub cache snapshot (``paths``), with its commit; local ones in the text."""
    listed, hub_ids = [], []
    for name in sources:
        origin = hub_origin(paths[name]) if paths and name in paths else None
        hub = parse_hub_id(name)
        if origin:
            hub_ids.append(origin[0])
            listed.append(f"- [`{origin[0]}`](https://huggingface.co/{origin[0]}) at commit `{origin[1]}`")
        elif hub:
            hub_ids.append(hub.repo_id)
            listed.append(f"- [`{hub}`](https://huggingface.co/{hub.repo_id})")
        else:
            listed.append(f"- `{name}` (a local model)")
    front: dict[str, Any] = {"library_name": "transformers"}
    if hub_ids:
        front = {"base_model": list(dict.fromkeys(hub_ids)), "base_model_relation": "merge", **front}
    if lic:
        front["license"] = lic
    front["tags"] = ["merge", "evomerge", "mergekit", *tags]
    return listed, front


def model_card(
    plan: MergePlan,
    extra: str = "",
    licences: dict[str, str | None] | None = None,
    paths: dict[str, Path] | None = None,
) -> str:
    """A README.md with YAML front matter that the Hub and mergekit users expect; the
    licence is the sources' when they all declare the same one (``shared_license``).

    The front matter's ``base_model`` lists Hub ids only (the Hub refuses anything
    else): a source named by a Hub id, or read from a Hub cache snapshot (``paths``).
    Every source, local ones included, is listed in the text, a Hub one with its commit.
    """
    recipe = plan.recipe
    sources = recipe.referenced_models()
    lic, why = shared_license(licences if licences is not None else dict.fromkeys(sources))
    listed, front = card_sources(sources, paths, lic)
    intro = [
        f"This model was made with evomerge using the **{recipe.merge_method}** merge method"
        + (f" with `{recipe.base_model}` as the base." if recipe.base_model else ".")
    ]
    config = ("Recipe", "mergekit_config.yml", "mergekit", recipe.to_yaml())
    return render_card(front, "Merged model", intro, listed, why, extra, config)


def render_card(
    front: dict[str, Any],
    title: str,
    intro: list[str],
    listed: list[str],
    why: str,
    extra: str,
    config: tuple[str, str, str, str],
) -> str:
    """A model card: front matter, ``title``, ``intro`` lines, the source models and the
    licence sentence, ``extra``, then ``config`` (heading, file name, the tool that can
    rebuild the model from it, its YAML text) as a section."""
    heading, file, tool, text = config
    body = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "", *intro, ""]
    body += ["## Source models", "", *listed, "", why, ""]
    if extra:
        body += [extra.rstrip(), ""]
    body += [f"## {heading}", "", f"The {heading.lower()}, also in `{file}` ({tool} can rebuild it):", ""]
    body += ["```yaml", text.rstrip(), "```", ""]
    return "\n".join(body)


def write_model_files(
    plan: MergePlan, ckpts: dict[str, Checkpoint], out: Path, *, seed: int = 0, card_extra: str = ""
) -> list[str]:
    """Write config, tokenizer, generation config, model card and recipe into ``out``."""
    written = ["config.json", "README.md", "mergekit_config.yml"]
    write_text(out / "config.json", json.dumps(merged_config(plan, ckpts), indent=2) + "\n")
    tok_dir = ckpts[plan.tokenizer_model].path
    if plan.vocab is not None and plan.vocab.source == "union" and hasattr(plan.vocab.tokenizer, "vocab_size"):
        before = {p.name for p in out.iterdir()}
        plan.vocab.tokenizer.save_pretrained(out)  # a tokenizer of its own: the union of the sources'
        written += sorted({p.name for p in out.iterdir()} - before)
    else:
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, out / name)
                written.append(name)
    gen = ckpts[plan.config_model].path / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
        written.append("generation_config.json")
    if plan.recipe.chat_template:
        template = _chat_template(plan.recipe.chat_template)
        if template is not None:
            write_text(out / "chat_template.jinja", template)
            written.append("chat_template.jinja")
    licences = {name: license_of(ckpts[name].path) for name in plan.recipe.referenced_models() if name in ckpts}
    paths = {name: ck.path for name, ck in ckpts.items()}
    write_text(out / "README.md", model_card(plan, card_extra, licences, paths))
    write_text(out / "mergekit_config.yml", plan.recipe.to_yaml())
    return sorted(set(written))
