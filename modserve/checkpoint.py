"""Hugging Face checkpoint directories, read lazily and written as a stream.

Only safetensors are ever read from user paths: a directory holding only
pickle weights (`*.bin`, `*.pt`) is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modserve.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# safetensors dtype codes <-> torch dtypes, for headers written without materialising tensors.
ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def layer_index(name: str) -> int | None:
    """`model.layers.7.mlp.up_proj.weight` -> 7; tensors outside the layer stack -> None."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hash of the tensor's raw bytes as stored (dtype-exact, layout-independent)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.cpu().numpy().data).hexdigest()


class Checkpoint:
    """A checkpoint directory: config, tensor names and shapes from headers, tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: missing (every checkpoint needs config.json)")
        try:
            self.config: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_file}: not valid JSON ({err})") from err
        self._handles: dict[str, object] = {}
        self.shard_of = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{self.path / shard}: listed in {INDEX_NAME} but missing")
            return weight_map
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{self.path}: weights are pickle files ({', '.join(pickles)}); modserve "
                    "loads only safetensors and never unpickles — convert them to safetensors first"
                )
            raise CheckpointError(f"{self.path}: no *.safetensors weight file")
        weight_map = {}
        for file in files:
            for name in self._open(file.name).keys():
                weight_map[name] = file.name
        return weight_map

    def _open(self, shard: str):
        if shard not in self._handles:
            file = self.path / shard
            try:
                self._handles[shard] = safe_open(file, framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
        return self._handles[shard]

    @property
    def names(self) -> list[str]:
        return list(self.shard_of)

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.shard_of.values()))

    @cached_property
    def num_layers(self) -> int:
        try:
            return int(self.config["num_hidden_layers"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{self.path / 'config.json'}: no num_hidden_layers") from err

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or [self.config.get("model_type", "?")])[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._shard(name)).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors dtype code (F32, BF16, ...) read from the header."""
        return self._open(self._shard(name)).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._open(self._shard(name)).get_tensor(name)

    def _shard(self, name: str) -> str:
        try:
            return self.shard_of[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing") from None

    def tensors(self, shard: str) -> Iterator[tuple[str, torch.Tensor]]:
        """One shard's tensors in file order, one at a time."""
        for name in (n for n, s in self.shard_of.items() if s == shard):
            yield name, self.get(name)


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2))


class StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor, so a shard never sits whole in memory.

    The header needs every name, dtype and shape up front; those come from the
    source headers, the bytes come one tensor at a time afterwards.
    """

    def __init__(self, file: Path, layout: list[tuple[str, str, tuple[int, ...]]]):
        self.file = file
        self.expected = [name for name, _, _ in layout]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in layout:
            size = _element_size(dtype)
            for dim in shape:
                size *= dim
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self._header = header
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._out = open(file, "wb")
        self._out.write(struct.pack("<Q", len(encoded)))
        self._out.write(encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.expected[self._next]
        entry = self._header[name]
        if name != expected or ST_DTYPES[tensor.dtype] != entry["dtype"]:
            raise CheckpointError(f"{self.file}: tensor {name!r} does not fit the planned layout")
        if list(tensor.shape) != entry["shape"]:
            raise CheckpointError(f"{self.file}: tensor {name!r} has shape {list(tensor.shape)}")
        self._out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._out.close()
        if self._next != len(self.expected):
            raise CheckpointError(f"{self.file}: only {self._next} of {len(self.expected)} tensors written")

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._out.close()


def _element_size(code: str) -> int:
    for dtype, c in ST_DTYPES.items():
        if c == code:
            return torch.empty((), dtype=dtype).element_size()
    raise CheckpointError(f"unsupported safetensors dtype {code}")
