"""Overlay a pack on its resident and write an ordinary Hugging Face checkpoint.

The merged checkpoint is the oracle every engine is tested against, and what a
user runs anywhere else. Shards are rewritten tensor by tensor in the resident's
own layout, so memory stays near the pack plus one tensor.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from modserve.checkpoint import (
    INDEX_NAME,
    PICKLE_SUFFIXES,
    Checkpoint,
    StreamingSafetensorsWriter,
    write_index,
)
from modserve.files import atomic_dir
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.delta import exact_tensors
from modserve.packs.format import ResidentHashes, load_verified_pack


def merge_pack(resident_path: Path, pack_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Verify the pack (sha256, resident fingerprint), then write resident-with-pack to `out_dir`
    (a delta pack as W_res + B·A)."""
    resident = Checkpoint(resident_path)
    manifest, stored = load_verified_pack(pack_path, ResidentHashes(resident))
    pack = exact_tensors(manifest, stored, resident)
    with atomic_dir(Path(out_dir)) as tmp:
        copy_side_files(resident.path, tmp)
        bar = tqdm(total=len(resident.names), desc="merge", unit="tensor", disable=not progress)
        total_size = 0
        for shard in resident.shards:
            names = [n for n, s in resident.shard_of.items() if s == shard]
            layout = [(n, resident.dtype(n), resident.shape(n)) for n in names]
            with StreamingSafetensorsWriter(tmp / shard, layout) as writer:
                for name in names:
                    tensor = pack[name] if name in pack else resident.get(name)
                    writer.write(name, tensor)
                    total_size += tensor.numel() * tensor.element_size()
                    bar.update()
        bar.close()
        if (resident.path / INDEX_NAME).is_file():
            write_index(tmp, dict(resident.shard_of), total_size)
    return Path(out_dir)


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, tokenizer, generation config...: everything but the weights."""
    for item in src.iterdir():
        if item.suffix == ".safetensors" or item.name == INDEX_NAME or item.suffix in PICKLE_SUFFIXES:
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)


def merge_expert(resident_path: Path, job: BuildJob, out_dir: Path, progress: bool = True) -> Path:
    """Build the pack in a scratch dir and merge it: one step from expert to merged checkpoint."""
    with tempfile.TemporaryDirectory(prefix="modserve-merge-") as scratch:
        (pack,) = build_packs(resident_path, [job], Path(scratch), progress)
        return merge_pack(resident_path, pack, out_dir, progress)
