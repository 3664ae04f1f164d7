"""Files read on the driver and written out again on a worker's node.

A Ray worker may run on a node that cannot see the driver's directories (no shared
storage). What it must read there (the fitness data, and with ``models_from: driver``
the source models) travels as :class:`Files`: the bytes of each file keyed by its
absolute path on the driver. A node writes them once under a directory named by their
digest (:meth:`Files.materialize`), mirroring the driver's paths, so that every path a
config names maps to one on the node by :func:`mirrored`. Several workers on one node
share the copy: it is written into a temporary directory and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class Files:
    """File contents keyed by absolute path on the machine that read them."""

    contents: dict[str, bytes]
    digest: str

    @classmethod
    def read(cls, paths: Iterable[Path]) -> Files:
        """The files at ``paths`` (absolute, each read once; a directory is read whole,
        hidden entries left out); a path that does not exist is left out (whoever opens it
        on the node names it)."""
        contents: dict[str, bytes] = {}
        for path in paths:
            path = Path(path).absolute()
            for file in _files_under(path):
                key = str(file)
                if key not in contents:
                    contents[key] = file.read_bytes()
        h = hashlib.sha256()
        for key in sorted(contents):
            h.update(key.encode() + b"\0" + hashlib.sha256(contents[key]).digest())
        return cls(contents, h.hexdigest()[:24])

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.contents.values())

    def materialize(self, cache: Path | None = None) -> Path:
        """Write the files under ``cache`` (a temporary directory of this machine by
        default) once; returns the root that :func:`mirrored` maps paths into."""
        cache = cache or Path(tempfile.gettempdir()) / "evomerge-shipped"
        root = cache / self.digest
        if root.is_dir():
            return root
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{self.digest}-", dir=cache))
        try:
            for key, data in self.contents.items():
                target = mirrored(work, Path(key))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            os.rename(work, root)
        except OSError as err:
            shutil.rmtree(work, ignore_errors=True)
            if root.is_dir():  # another worker of this node wrote it first
                return root
            reason = err.strerror or str(err)
            raise EvomergeError(f"{cache}: cannot write the files shipped from the driver ({reason})") from None
        return root


def mirrored(root: Path, path: Path) -> Path:
    """Where the driver's absolute ``path`` lies under ``root``."""
    path = Path(path).absolute()
    return root / path.relative_to(path.anchor)


def fetch(value: Any) -> Files:
    """The :class:`Files` itself, or what a stored handle of it loads (its ``load()``:
    the Ray pool keeps large shipments in the object store)."""
    return value if isinstance(value, Files) else value.load()


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    out = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(folder) / f for f in sorted(files) if not f.startswith(".")]
    return out
