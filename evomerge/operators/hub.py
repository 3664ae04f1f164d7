"""Model references as Hugging Face Hub ids, resolved through the local Hub cache.

A reference is a Hub id when it is not an existing local path and reads
``org/name`` or ``org/name@revision`` (a branch, tag or commit). It resolves with
``huggingface_hub.snapshot_download`` to a snapshot directory of the Hub cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, read when called): from the cache alone
when ``HF_HUB_OFFLINE`` is set or the snapshot is already there, else downloaded
(weights, config, tokenizer and model card only). A snapshot's directory name is
its commit, which lineage and model cards record beside the id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import ModelError

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "README.md", "*.bin"]


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(ref: str) -> HubRef | None:
    """The Hub id that ``ref`` names, or None (a local path, or not an id's shape)."""
    m = _ID.match(ref)
    if m is None or ref.startswith((".", "~")) or Path(ref).expanduser().exists():
        return None
    return HubRef(m.group("repo"), m.group("rev"))


def hub_cache() -> Path:
    """The Hub cache as ``huggingface_hub`` would pick it, from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_id(ref: HubRef) -> Path:
    """The local snapshot directory of ``ref``; one-line :class:`ModelError` when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if offline():
            raise ModelError(
                f"model '{ref}' is not in the local Hub cache ({cache}) and HF_HUB_OFFLINE is set"
            ) from None
    try:
        path = snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache, allow_patterns=_FILES)
    except Exception as err:  # network, auth, missing repo or revision: all one line for the user
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(
            f"model '{ref}': not in the local Hub cache ({cache}) and cannot be downloaded: {first}"
        ) from None
    return Path(path)


def hub_origin(path: Path) -> tuple[str, str] | None:
    """``(repo_id, commit)`` when ``path`` is a snapshot directory of a Hub cache, else None."""
    path = Path(path)
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith("models--"):
        return None
    repo = path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return repo, path.name


def portable_ref(path: str | Path) -> str:
    """How a recipe should name the model at ``path``: ``org/name@<commit>`` for a Hub cache
    snapshot, else the path."""
    origin = hub_origin(Path(path))
    return f"{origin[0]}@{origin[1]}" if origin else str(path)


def hub_fields(path: Path) -> dict[str, str]:
    """``{"hub_id", "revision"}`` for a Hub cache snapshot (what lineage records), else ``{}``."""
    origin = hub_origin(path)
    return {"hub_id": origin[0], "revision": origin[1]} if origin else {}
