"""The block-pack format `modserve.pack/2`: blocks.safetensors plus manifest.json.

A pack is only meaningful on the resident it was cut for, so its manifest
fingerprints both parents; every tensor carries its sha256 so a flipped byte on
disk is caught before it reaches a forward pass. An exact pack stores each replaced
tensor whole; a delta pack stores a swapped linear as low-rank factors of its change
(`<name>.lora_A`, `<name>.lora_B`, each entry naming the tensor it is a `factor_of`).
Version 1 manifests (exact packs before delta packs existed) are read as exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modserve import __version__
from modserve.checkpoint import Checkpoint, layer_index, tensor_sha256
from modserve.errors import ModserveError, PackError
from modserve.files import atomic_dir
from modserve.packs.plan import Plan

FORMAT = "modserve.pack/2"
READABLE_FORMATS = ("modserve.pack/1", FORMAT)
KINDS = ("exact", "delta")
BLOCKS = "blocks.safetensors"
MANIFEST = "manifest.json"


def structure_fingerprint(ckpt: Checkpoint) -> dict:
    """Architecture and every tensor's name, shape and dtype — read from headers only."""
    layout = sorted((n, list(ckpt.shape(n)), ckpt.dtype(n)) for n in ckpt.names)
    return {
        "architecture": ckpt.architecture,
        "num_layers": ckpt.num_layers,
        "hidden_size": ckpt.config.get("hidden_size"),
        "vocab_size": ckpt.config.get("vocab_size"),
        "structure_sha256": hashlib.sha256(json.dumps(layout).encode()).hexdigest(),
    }


def content_sha256(tensor_hashes: dict[str, str]) -> str:
    """One hash over named tensor hashes, independent of iteration order."""
    joined = "\n".join(f"{name} {digest}" for name, digest in sorted(tensor_hashes.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


@dataclass
class Manifest:
    language: str
    plan: Plan
    num_layers: int
    dtype: str
    tensors: dict[str, dict]  # stored name -> {sha256, shape, dtype, source, weight[, factor_of]}
    resident: dict  # structure fingerprint + content_sha256 of the tensors the pack replaces
    expert: dict
    version: str = __version__
    format: str = FORMAT
    kind: str = "exact"
    delta: dict | None = None  # delta packs: scheme, rank choice, per replaced linear its fit
    fidelity: dict | None = None  # delta packs: measured against the exact pack (or why not)
    extra: dict = field(default_factory=dict)

    @property
    def content_sha256(self) -> str:
        """One hash of everything the pack holds (its tensors' sha256s)."""
        return content_sha256({name: entry["sha256"] for name, entry in self.tensors.items()})

    @property
    def layers(self) -> list[int]:
        return sorted({i for i in map(layer_index, self.tensors) if i is not None})

    @property
    def non_layer_tensors(self) -> list[str]:
        return sorted(n for n in self.tensors if layer_index(n) is None)

    @property
    def replaced(self) -> list[str]:
        """The resident tensors this pack replaces (a factored one once, under its HF name)."""
        return sorted({entry.get("factor_of", name) for name, entry in self.tensors.items()})

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "language": self.language,
            "plan": self.plan.to_dict(),
            "num_layers": self.num_layers,
            "layers": self.layers,
            "non_layer_tensors": self.non_layer_tensors,
            "dtype": self.dtype,
            "kind": self.kind,
            **({"delta": self.delta, "fidelity": self.fidelity} if self.kind == "delta" else {}),
            "tensors": self.tensors,
            "resident": self.resident,
            "expert": self.expert,
            "modserve_version": self.version,
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict, where: Path) -> Manifest:
        if data.get("format") not in READABLE_FORMATS:
            raise PackError(f"{where}: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("kind", "exact") not in KINDS:
            raise PackError(f"{where}: kind is {data.get('kind')!r}, expected one of {KINDS}")
        try:
            manifest = cls(
                language=str(data["language"]),
                plan=Plan.from_dict(data["plan"]),
                num_layers=int(data["num_layers"]),
                dtype=str(data["dtype"]),
                tensors=dict(data["tensors"]),
                resident=dict(data["resident"]),
                expert=dict(data["expert"]),
                version=str(data["modserve_version"]),
                format=str(data["format"]),
                kind=str(data.get("kind", "exact")),
                delta=data.get("delta"),
                fidelity=data.get("fidelity"),
            )
        except KeyError as err:
            raise PackError(f"{where}: missing field {err.args[0]!r}") from None
        except (TypeError, ValueError, ModserveError) as err:
            raise PackError(f"{where}: malformed ({err})") from None
        for name, entry in manifest.tensors.items():
            if not isinstance(entry, dict) or "sha256" not in entry:
                raise PackError(f"{where}: tensors.{name}: no sha256")
        return manifest


def read_manifest(pack_dir: str | Path) -> Manifest:
    pack_dir = Path(pack_dir)
    file = pack_dir / MANIFEST
    if not file.is_file():
        raise PackError(f"{file}: missing — {pack_dir} is not a block pack")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise PackError(f"{file}: not valid JSON ({err})") from None
    return Manifest.from_json(data, file)


def load_pack(pack_dir: str | Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Manifest and tensors, each tensor checked against its recorded sha256."""
    pack_dir = Path(pack_dir)
    manifest = read_manifest(pack_dir)
    file = pack_dir / BLOCKS
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as err:
        raise PackError(f"{file}: not a readable safetensors file ({err})") from None
    if set(tensors) != set(manifest.tensors):
        missing = sorted(set(manifest.tensors) - set(tensors))
        extra = sorted(set(tensors) - set(manifest.tensors))
        raise PackError(f"{file}: tensors differ from {MANIFEST} (missing {missing}, unlisted {extra})")
    for name, tensor in tensors.items():
        if tensor_sha256(tensor) != manifest.tensors[name]["sha256"]:
            raise PackError(f"{file}: tensor {name!r} fails its sha256 check (corrupted pack)")
    return manifest, tensors


def load_verified_pack(
    pack_dir: str | Path, resident: ResidentHashes, language: str | None = None
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """A pack fit to serve on this resident: every tensor's sha256, the resident's fingerprint,
    and (when given) the language it must be for. Every reader of packs goes through here."""
    manifest, tensors = load_pack(pack_dir)
    if language is not None and manifest.language != language:
        raise PackError(f"packs.{language}: {pack_dir} is the {manifest.language!r} pack")
    resident.check(manifest, Path(pack_dir))
    return manifest, tensors


class ResidentHashes:
    """sha256 of resident tensors, computed once each, to check packs against their resident."""

    def __init__(self, resident: Checkpoint):
        self.resident = resident
        self._hashes: dict[str, str] = {}
        self._structure: dict | None = None

    @property
    def structure(self) -> dict:
        if self._structure is None:
            self._structure = structure_fingerprint(self.resident)
        return self._structure

    def of(self, name: str, tensor: torch.Tensor | None = None) -> str:
        """Hash of resident tensor `name`; pass the tensor when it is already loaded."""
        if name not in self._hashes:
            loaded = self.resident.get(name) if tensor is None else tensor
            self._hashes[name] = tensor_sha256(loaded)
        return self._hashes[name]

    def fingerprint(self, replaced: list[str]) -> dict:
        hashes = {name: self.of(name) for name in replaced}
        return {**self.structure, "content_sha256": content_sha256(hashes)}

    def check(self, manifest: Manifest, where: Path) -> None:
        """Refuse a pack cut for another resident: structure first, then the replaced tensors."""
        recorded = manifest.resident
        for key, value in self.structure.items():
            if recorded.get(key) != value:
                raise PackError(
                    f"{where}: built for another resident ({key} is {recorded.get(key)!r}, "
                    f"resident {self.resident.path} has {value!r})"
                )
        unknown = [n for n in manifest.replaced if n not in self.resident.shard_of]
        if unknown:
            raise PackError(f"{where}: tensors not in resident {self.resident.path}: {unknown[:3]}")
        actual = self.fingerprint(manifest.replaced)["content_sha256"]
        if recorded.get("content_sha256") != actual:
            raise PackError(
                f"{where}: built for another resident (content of the replaced tensors differs "
                f"from {self.resident.path})"
            )


def write_pack(target: Path, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Path:
    with atomic_dir(target) as tmp:
        save_file(tensors, tmp / BLOCKS, metadata={"format": "pt", "modserve": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return target
