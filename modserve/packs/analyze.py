"""Which layers did each expert move? ‖θ_E − θ_B‖ / ‖θ_B‖ per module, per layer.

The paper picks the layers to swap from exactly this: the language expert moved
the bottom and top layers more than the math expert did, the math expert the
middle. Tensors are streamed one at a time (the base's once, then each expert's).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from modserve.checkpoint import Checkpoint, layer_index
from modserve.errors import ModserveError
from modserve.files import write_atomic, write_text_atomic
from modserve.packs.build import check_compatible

MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "input_layernorm", "post_attention_layernorm",
)
NON_LAYER = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}


def module_of(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.bias` -> q_proj: a module's bias counts with its weight."""
    parts = name.split(".")
    return parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]


@dataclass
class Analysis:
    experts: list[str]
    num_layers: int
    modules: list[str]
    by_module: dict[str, dict[str, list[float]]]  # expert -> module -> per-layer change
    by_layer: dict[str, list[float]]  # expert -> per-layer change (all the layer's tensors)
    non_layer: dict[str, dict[str, float]]  # expert -> embed_tokens / norm / lm_head

    def suggest(self, math: str, language: str) -> dict:
        """bottom/top: the leading and trailing layers where `language` moved more than `math`."""
        moved_more = [lang > m for lang, m in zip(self.by_layer[language], self.by_layer[math], strict=True)]
        bottom = next((i for i, more in enumerate(moved_more) if not more), len(moved_more))
        top = next((i for i, more in enumerate(reversed(moved_more)) if not more), len(moved_more))
        top = min(top, len(moved_more) - bottom)
        return {"math": math, "language": language, "bottom": bottom, "top": top}

    def suggestions(self, math: str | None) -> list[dict]:
        if len(self.experts) < 2:
            return []
        math = math or ("math" if "math" in self.experts else self.experts[0])
        if math not in self.experts:
            raise ModserveError(f"--math: {math!r} is not one of the experts ({', '.join(self.experts)})")
        return [self.suggest(math, e) for e in self.experts if e != math]

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["expert", "layer", "module", "relative_change"])
        for expert in self.experts:
            for layer, value in enumerate(self.by_layer[expert]):
                writer.writerow([expert, layer, "all", f"{value:.6g}"])
            for module, values in self.by_module[expert].items():
                for layer, value in enumerate(values):
                    writer.writerow([expert, layer, module, f"{value:.6g}"])
            for name, value in self.non_layer[expert].items():
                writer.writerow([expert, "", name, f"{value:.6g}"])
        return out.getvalue()

    def to_json(self, math: str | None) -> dict:
        return {
            "experts": self.experts,
            "num_layers": self.num_layers,
            "per_layer": self.by_layer,
            "per_module": self.by_module,
            "non_layer": self.non_layer,
            "suggestions": self.suggestions(math),
        }


def analyze(base_path: Path, experts: dict[str, Path], progress: bool = True) -> Analysis:
    base = Checkpoint(base_path)
    checkpoints = {name: Checkpoint(path) for name, path in experts.items()}
    for expert in checkpoints.values():
        check_compatible(base, expert)
    delta = defaultdict(float)  # (expert, layer, module) -> sum of squared differences
    norm = defaultdict(float)  # (layer, module) -> sum of squared base values
    for name in tqdm(base.names, desc="analyze", unit="tensor", disable=not progress):
        theta = base.get(name).float()
        layer = layer_index(name)
        key = (layer, module_of(name)) if layer is not None else (None, NON_LAYER.get(name, name))
        norm[key] += float(theta.pow(2).sum())
        for expert, ckpt in checkpoints.items():
            delta[(expert, *key)] += float((ckpt.get(name).float() - theta).pow(2).sum())
    return summarize(list(experts), base.num_layers, delta, norm)


def summarize(experts: list[str], num_layers: int, delta: dict, norm: dict) -> Analysis:
    def ratio(d: float, n: float) -> float:
        return math.sqrt(d / n) if n > 0 else 0.0

    modules = [m for m in MODULES if any((i, m) in norm for i in range(num_layers))]
    modules += sorted({m for (i, m) in norm if i is not None and m not in modules})
    by_module = {
        e: {m: [ratio(delta[(e, i, m)], norm[(i, m)]) for i in range(num_layers)] for m in modules} for e in experts
    }
    by_layer = {
        e: [
            ratio(sum(delta[(e, i, m)] for m in modules), sum(norm[(i, m)] for m in modules))
            for i in range(num_layers)
        ]
        for e in experts
    }
    outer = sorted(m for (i, m) in norm if i is None)
    non_layer = {e: {m: ratio(delta[(e, None, m)], norm[(None, m)]) for m in outer} for e in experts}
    return Analysis(experts, num_layers, modules, by_module, by_layer, non_layer)


def table(analysis: Analysis):
    """Per-layer change of every expert, as a rich table (layers as rows)."""
    from rich.table import Table

    grid = Table("layer", *analysis.experts, title="relative change ‖θ_E−θ_B‖/‖θ_B‖")
    for layer in range(analysis.num_layers):
        values = [analysis.by_layer[e][layer] for e in analysis.experts]
        top = max(values)
        grid.add_row(str(layer), *(f"[bold]{v:.4f}[/bold]" if v == top and len(values) > 1 else f"{v:.4f}" for v in values))
    for name in next(iter(analysis.non_layer.values()), {}):
        grid.add_row(name, *(f"{analysis.non_layer[e][name]:.4f}" for e in analysis.experts))
    return grid


def heatmap(analysis: Analysis, file: Path) -> None:
    """Layers × module types, one panel per expert, one shared (log) colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    grids = {e: torch.tensor([analysis.by_module[e][m] for m in analysis.modules]).T for e in analysis.experts}
    positive = torch.cat([g.flatten() for g in grids.values()])
    positive = positive[positive > 0]
    scale = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if len(positive) else None
    width = 2.2 + 2.6 * len(grids)
    fig, axes = plt.subplots(1, len(grids), figsize=(width, 1.2 + 0.28 * analysis.num_layers), squeeze=False)
    for axis, (expert, grid) in zip(axes[0], grids.items(), strict=True):
        image = axis.imshow(grid.numpy(), aspect="auto", cmap="viridis", norm=scale, origin="lower")
        axis.set_title(expert)
        axis.set_xticks(range(len(analysis.modules)), [m.replace("_layernorm", "_ln") for m in analysis.modules],
                        rotation=60, ha="right", fontsize=7)
        axis.set_yticks(range(analysis.num_layers), [str(i) for i in range(analysis.num_layers)], fontsize=7)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="‖θ_E − θ_B‖ / ‖θ_B‖")
    fig.suptitle("How far each expert moved from the base, per layer and module")
    fig.savefig(file, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(analysis: Analysis, out: Path, math: str | None) -> list[Path]:
    """analysis.csv, analysis.json and heatmap.png in `out`, each written whole."""
    report = json.dumps(analysis.to_json(math), indent=2) + "\n"
    return [
        write_text_atomic(out / "analysis.csv", analysis.csv()),
        write_text_atomic(out / "analysis.json", report),
        write_atomic(out / "heatmap.png", lambda tmp: heatmap(analysis, tmp)),
    ]
