"""analyze: relative change per module and layer, and the planted swap boundaries recovered."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
from matplotlib.image import imread

from modserve.checkpoint import Checkpoint
from modserve.demo.synthetic import TinySpec, build_family
from modserve.errors import CheckpointError
from modserve.packs.analyze import analyze, write_outputs
from tests.conftest import MODSERVE


@pytest.mark.parametrize(
    "spec",
    [TinySpec(), TinySpec(num_layers=10, planted_bottom=2, planted_top=3, seed=5, shards=3, tie_embeddings=True)],
    ids=["12-layers-3-2", "10-layers-2-3-sharded-tied"],
)
def test_planted_boundaries_are_recovered(tmp_path, spec):
    family = build_family(tmp_path, spec, ("sw", "ja"))
    analysis = analyze(family.base, {"math": family.math, **family.languages}, progress=False)
    suggestions = {s["language"]: (s["bottom"], s["top"]) for s in analysis.suggestions(None)}
    assert suggestions == {"sw": (spec.planted_bottom, spec.planted_top), "ja": (spec.planted_bottom, spec.planted_top)}
    assert ("lm_head" in analysis.non_layer["sw"]) == (not spec.tie_embeddings)


def test_relative_change_matches_a_direct_computation(family):
    analysis = analyze(family.base, {"math": family.math, "sw": family.languages["sw"]}, progress=False)
    base, sw = Checkpoint(family.base), Checkpoint(family.languages["sw"])

    def rel(names):
        num = sum(float((sw.get(n) - base.get(n)).pow(2).sum()) for n in names)
        return (num / sum(float(base.get(n).pow(2).sum()) for n in names)) ** 0.5

    assert analysis.by_module["sw"]["q_proj"][4] == pytest.approx(rel(["model.layers.4.self_attn.q_proj.weight"]), rel=1e-5)
    layer0 = [n for n in base.names if n.startswith("model.layers.0.")]
    assert analysis.by_layer["sw"][0] == pytest.approx(rel(layer0), rel=1e-5)
    assert analysis.non_layer["sw"]["embed_tokens"] == pytest.approx(rel(["model.embed_tokens.weight"]), rel=1e-5)


def test_outputs_csv_json_and_heatmap(family, tmp_path):
    analysis = analyze(family.base, {"math": family.math, "te": family.languages["te"]}, progress=False)
    files = write_outputs(analysis, tmp_path / "out", None)
    assert [f.name for f in files] == ["analysis.csv", "analysis.json", "heatmap.png"]
    rows = list(csv.DictReader((tmp_path / "out" / "analysis.csv").open()))
    assert {r["expert"] for r in rows} == {"math", "te"}
    assert len([r for r in rows if r["expert"] == "te" and r["module"] == "q_proj"]) == 12
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert report["suggestions"] == [{"math": "math", "language": "te", "bottom": 3, "top": 2}]
    image = imread(tmp_path / "out" / "heatmap.png")
    assert image.shape[0] > 300 and image.shape[1] > 500 and image[..., :3].std() > 0.05


def test_cli_prints_the_table_and_a_build_hint(family, tmp_path):
    result = subprocess.run(
        [*MODSERVE, "analyze", "--base", str(family.base), "--expert", f"math={family.math}",
         "--expert", str(family.languages["sw"]), "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, check=True,
    )
    assert "embed_tokens" in result.stdout and "--bottom 3 --top 2" in result.stdout
    assert (tmp_path / "out" / "heatmap.png").is_file()
    single = subprocess.run([*MODSERVE, "analyze", "--base", str(family.base), "--expert", str(family.math), "--quiet"],
                            capture_output=True, text=True, check=True)
    assert "one expert only" in single.stdout


def test_an_expert_of_another_shape_is_refused_and_nothing_is_written(family, tmp_path):
    other = build_family(tmp_path / "wide", TinySpec(hidden_size=160, num_heads=5, num_kv_heads=5), ("sw",)).languages["sw"]
    result = subprocess.run(
        [*MODSERVE, "analyze", "--base", str(family.base), "--expert", str(other), "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1 and str(other) in result.stderr and "shape" in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError):
        analyze(family.base, {"x": other}, progress=False)
