"""Shared fixtures: tiny expert families and the demo, built once per session, offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from modserve.demo.builtin import DemoPaths, build_demo
from modserve.demo.synthetic import Family, TinySpec, build_family

REPO = Path(__file__).resolve().parents[1]
MGSM_DIR = REPO / "data" / "mgsm"  # vendored, CC BY 4.0 (its README is the attribution)
MODSERVE = [sys.executable, "-m", "modserve"]


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Family:
    """Default tiny Llama family: base, math, and sw/te experts (12 layers, fp32)."""
    return build_family(tmp_path_factory.mktemp("family"), TinySpec(), ("sw", "te"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> DemoPaths:
    """The built-in demo (math resident, sw/te/bn/ja packs), as `modserve serve` uses it."""
    return build_demo(tmp_path_factory.mktemp("demo") / "demo", progress=False)


@pytest.fixture(scope="session")
def merged(demo, tmp_path_factory) -> dict[str, Path]:
    """The oracle checkpoints: the demo resident merged with each pack, plus `resident` itself."""
    from modserve.packs.merge import merge_pack

    root = tmp_path_factory.mktemp("merged")
    out = {lang: merge_pack(demo.resident, pack, root / lang, progress=False) for lang, pack in demo.packs.items()}
    return {**out, "resident": demo.resident}


@pytest.fixture(scope="session")
def mgsm_dir() -> Path:
    return MGSM_DIR
