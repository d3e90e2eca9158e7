"""Fidelity of delta packs against exact packs, per kind of expert: planted jitter vs real steps.

    python eval/delta_fidelity.py [--out docs/delta-fidelity.md]

Two families of the bench's tiny shape (12 layers, 256 wide): the synthetic one (seeded
random jitter, strong in the outer layers: the worst case for a low-rank fit) and the
trained one (`modserve.demo.finetune`: AdamW steps on MGSM text). For each rank choice it
builds sw and ja delta packs and reads what `build` measured: the energy kept and
‖Δ − BA‖/‖W_lang‖ per matrix (means over the packs' matrices), and teacher-forced KL and
top-1 agreement with the exact pack on 32 held-out MGSM questions per language.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from modserve.bench.models import PLANS, RECIPES, SPECS
from modserve.demo.finetune import HELD_OUT, read_questions, train_family
from modserve.demo.synthetic import build_family
from modserve.packs.build import BuildJob, build_packs
from modserve.packs.fidelity import REPOSITORY_MGSM as MGSM
from modserve.packs.format import read_manifest
from modserve.packs.lowrank import RankChoice

LANGUAGES = ("sw", "ja")
CHOICES = [RankChoice(rank=r) for r in (4, 8, 16, 32, 64)] + [RankChoice(energy=e) for e in (0.5, 0.8, 0.9, 0.95)]


def rows(kind: str, family, root: Path) -> list[str]:
    prompts = {lang: read_questions(MGSM, lang, slice(HELD_OUT, HELD_OUT + 32)) for lang in LANGUAGES}
    out = []
    for k, choice in enumerate(CHOICES):
        jobs = [BuildJob(lang, family.languages[lang], PLANS["tiny"], choice) for lang in LANGUAGES]
        packs = [read_manifest(p) for p in build_packs(family.math, jobs, root / f"{kind}-{k}", False, prompts)]
        fits = [f for m in packs for f in m.delta["tensors"].values()]
        tokens = sum(m.fidelity["tokens"] for m in packs)
        kl = sum(m.fidelity["kl_mean"] * m.fidelity["tokens"] for m in packs) / tokens
        top1 = sum(m.fidelity["top1_agreement"] * m.fidelity["tokens"] for m in packs) / tokens
        target = f"rank {choice.rank}" if choice.rank else f"energy {choice.energy}"
        out.append(
            f"| {kind} | {target} | {statistics.mean(f['rank'] for f in fits):.1f} "
            f"| {statistics.mean(f['energy'] for f in fits):.3f} "
            f"| {statistics.mean(f['relative_error'] for f in fits):.4f} | {kl:.2e} | {top1:.4f} |"
        )
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table (markdown) here too")
    args = parser.parse_args()
    header = [
        "| experts | target | mean rank | mean energy kept | mean ‖Δ−BA‖/‖W‖ | KL mean (nats) | top-1 agreement |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory(prefix="modserve-fidelity-") as tmp:
        root = Path(tmp)
        spec = SPECS["tiny"]
        trained = train_family(root / "trained", spec, LANGUAGES, RECIPES["tiny"]).family
        planted = build_family(root / "planted", spec, LANGUAGES)
        table = header + rows("planted jitter", planted, root) + rows("AdamW steps", trained, root)
    if args.out:
        args.out.write_text("\n".join(table) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
