"""Reading model directories: config, safetensors shards, and guarded pickle.

Safetensors headers are parsed and checked against the file size before any
tensor is touched, so a truncated file or a header that claims huge shapes is
refused without a large allocation. Pickle checkpoints are refused unless the
caller allows them, and then load with ``weights_only=True`` (no code runs).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import ModelError

SAFE_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFE_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.pt", "model.pt")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data in ``file``

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; raise :class:`ModelError` naming the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ModelError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise ModelError(f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size})")
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: corrupt safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFE_DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            start, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor '{name}' has a malformed or unsupported header entry") from None
        info = TensorInfo(name, path, dtype, shape, 8 + n + start)
        if any(d < 0 for d in shape) or end - start != info.nbytes or not (0 <= start <= end <= data_size):
            raise ModelError(
                f"{path}: tensor '{name}' claims shape {list(shape)} at bytes [{start}, {end}) "
                f"but the file holds {data_size} data bytes (corrupt or truncated)"
            )
        out[name] = info
    return out


@dataclass
class Checkpoint:
    """A model directory: its config and an index of its tensors (nothing loaded yet)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    pickled: dict[str, Tensor] | None = None
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int | None:
        value = self.config.get("num_hidden_layers", self.config.get("n_layer"))
        return int(value) if value is not None else None

    @property
    def vocab_size(self) -> int | None:
        value = self.config.get("vocab_size")
        return int(value) if value is not None else None

    def get(self, name: str, device: str | torch.device = "cpu") -> Tensor:
        """Read one tensor's bytes into a fresh tensor.

        Plain positioned reads rather than a memory map: pages of the files never
        count towards this process's memory, only the tensors it holds.
        """
        if self.pickled is not None:  # held tensors: as they are on their own device, else copied
            held = self.pickled[name]
            return held.to(device, non_blocking=held.is_pinned())  # pinned: asynchronous to a GPU
        info = self.tensors.get(name)
        if info is None:
            raise ModelError(f"{self.path}: has no tensor '{name}'")
        fd = self._handles.get(info.file)
        if fd is None:
            fd = self._handles[info.file] = os.open(info.file, os.O_RDONLY)
        tensor = torch.empty(info.shape, dtype=info.dtype)
        buf = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")  # type: ignore[arg-type]
        done = 0
        while done < len(buf):
            got = os.preadv(fd, [buf[done:]], info.offset + done)
            if got <= 0:
                raise ModelError(f"{info.file}: unexpected end of file reading tensor '{name}'")
            done += got
        return tensor.to(device) if str(device) != "cpu" else tensor

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{cfg}: unreadable JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{cfg}: not a JSON object")
    return data


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelError(f"{index}: malformed shard index: {err}") from None
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            p = (path / shard).resolve()
            if p.parent != path.resolve():
                raise ModelError(f"{index}: shard '{shard}' lies outside the model directory")
            if not p.is_file():
                raise ModelError(f"{index}: shard '{shard}' is missing")
            files.append(p)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(path.glob("*.safetensors"))


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    files = [path / n for n in PICKLE_NAMES if (path / n).is_file()] or sorted(path.glob("pytorch_model-*.bin"))
    if not files:
        raise ModelError(f"{path}: no safetensors or PyTorch weights found")
    if not allow_pickle:
        raise ModelError(
            f"{path}: has only pickle weights ({files[0].name}); pickle can run code when loaded. "
            "Convert to safetensors, or pass --allow-pickle to load it with weights_only=True"
        )
    state: dict[str, Tensor] = {}
    for f in files:
        try:
            loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # an UnpicklingError for hostile payloads, among others
            raise ModelError(f"{f}: refused to load pickle weights: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
            raise ModelError(f"{f}: pickle file is not a plain state dict of tensors")
        state.update(loaded)
    return state


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Index a model directory without loading its weights."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model path '{path}' does not exist")
    if not p.is_dir():
        raise ModelError(f"model path '{path}' is not a directory")
    config = _read_config(p)
    files = _safetensors_files(p)
    if files:
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            tensors.update(read_safetensors_header(f))
        return Checkpoint(p, config, tensors)
    state = _load_pickle(p, allow_pickle)
    infos = {k: TensorInfo(k, p, v.dtype, tuple(v.shape)) for k, v in state.items()}
    return Checkpoint(p, config, infos, pickled=state)
