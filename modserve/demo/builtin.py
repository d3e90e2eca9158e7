"""The built-in demo: tiny seeded experts and their packs, identical on every machine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from modserve.demo.synthetic import TinySpec, build_family
from modserve.files import atomic_dir
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.plan import Plan

DEMO_LANGUAGES = ("sw", "te", "bn", "ja")
DEMO_SPEC = TinySpec(num_layers=12, planted_bottom=3, planted_top=2, dtype="float32", seed=2025)
# The planted boundaries of DEMO_SPEC, as `modserve analyze` suggests them.
DEMO_PLAN = Plan(bottom=3, top=2, transition=1, transition_weight=0.5, non_layer="resident")
READY_MARK = "demo.ok"


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def resident(self) -> Path:
        return self.root / "experts" / "math"

    @property
    def base(self) -> Path:
        return self.root / "experts" / "base"

    def expert(self, language: str) -> Path:
        return self.root / "experts" / language

    def pack(self, language: str) -> Path:
        return self.root / "packs" / f"{language}.pack"

    @property
    def packs(self) -> dict[str, Path]:
        return {lang: self.pack(lang) for lang in DEMO_LANGUAGES}


def build_demo(out: Path, progress: bool = True) -> DemoPaths:
    """Experts under `out/experts/`, packs under `out/packs/`; written atomically."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        family = build_family(tmp / "experts", DEMO_SPEC, DEMO_LANGUAGES)
        jobs = [BuildJob(lang, path, DEMO_PLAN) for lang, path in family.languages.items()]
        build_packs(family.math, jobs, tmp / "packs", progress)
        (tmp / READY_MARK).write_text("ok\n")
    return DemoPaths(out)


def default_cache_dir() -> Path:
    if os.environ.get("MODSERVE_CACHE"):
        return Path(os.environ["MODSERVE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "modserve"


def ensure_demo(root: Path | None = None, progress: bool = True) -> DemoPaths:
    """The demo under the cache dir, built on first use."""
    root = Path(root) if root else default_cache_dir() / "demo"
    if (root / READY_MARK).is_file():
        return DemoPaths(root)
    return build_demo(root, progress)
