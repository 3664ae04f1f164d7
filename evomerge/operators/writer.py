"""Streaming safetensors output and atomic output directories.

Shapes and dtypes of every output tensor are known from the plan, so each
shard's header is written first and tensors are appended as they are computed:
no shard is ever buffered in memory.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from evomerge.errors import EvomergeError
from evomerge.operators.checkpoint import DTYPE_NAMES

Entry = tuple[str, tuple[int, ...], torch.dtype]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def shard_layout(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Split entries, in order, into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nb = _nbytes(e[1], e[2])
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nb
    return shards


def _disk_error(err: OSError, path: Path) -> EvomergeError:
    if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return EvomergeError(f"{path}: no space left on device (or file too large) while writing the merge")
    return EvomergeError(f"{path}: cannot write: {err.strerror or err}")


class ShardWriter:
    """Writes tensors, in the planned order, into one or more safetensors shards."""

    def __init__(self, directory: Path, entries: Sequence[Entry], max_shard_bytes: int):
        self.dir = directory
        self.shards = shard_layout(entries, max_shard_bytes)
        n = len(self.shards)
        self.names = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._queue = [(shard_i, e) for shard_i, shard in enumerate(self.shards) for e in shard]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._shard = -1

    def _open(self, index: int) -> None:
        self._close_file()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.shards[index]:
            nb = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nb]}
            offset += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = self.dir / self.names[index]
        try:
            self._file = path.open("wb")
            self._file.write(struct.pack("<Q", len(raw)))
            self._file.write(raw)
        except OSError as err:
            raise _disk_error(err, path) from None
        self._shard = index

    def write(self, name: str, tensor: Tensor) -> None:
        shard_i, (want, shape, dtype) = self._queue[self._pos]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer expected {want} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard_i != self._shard:
            self._open(shard_i)
        assert self._file is not None
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            self._file.write(memoryview(data))  # type: ignore[arg-type]
        except OSError as err:
            raise _disk_error(err, self.dir / self.names[shard_i]) from None
        self._pos += 1

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as err:
                raise _disk_error(err, self.dir / self.names[self._shard]) from None
            self._file = None

    def finish(self) -> list[str]:
        """Close the last shard, write the index when sharded; return the files written."""
        if self._pos != len(self._queue):
            raise RuntimeError(f"writer got {self._pos} of {len(self._queue)} tensors")
        self._close_file()
        if len(self.names) > 1:
            weight_map = {e[0]: self.names[i] for i, shard in enumerate(self.shards) for e in shard}
            total = sum(_nbytes(e[1], e[2]) for shard in self.shards for e in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_text(self.dir / "model.safetensors.index.json", json.dumps(index, indent=2))
            return [*self.names, "model.safetensors.index.json"]
        return list(self.names)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as err:
        raise _disk_error(err, path) from None


@contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` on success.

    On any failure the temporary directory is removed and ``out`` is untouched.
    """
    if out.exists() and not overwrite:
        raise EvomergeError(f"{out}: already exists (choose another directory or pass --force)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as err:
        raise _disk_error(err, out.parent) from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, EvomergeError) and str(tmp) in str(err):  # name the directory the user asked for
            raise EvomergeError(str(err).replace(str(tmp), str(out))) from None
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise _disk_error(err, out) from None
        raise
