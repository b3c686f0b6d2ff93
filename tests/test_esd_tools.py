"""Hill estimator, allocations, layer types and the inline-SVG pictures."""

from __future__ import annotations

import csv
import io
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from netanatomy.errors import UserError
from netanatomy.report.svg import esd_svg, scatter_svg
from netanatomy.spectral.allocate import allocate, lr_allocation, parse_allocate, sparsity_allocation
from netanatomy.spectral.layertypes import layer_depth, layer_type
from netanatomy.spectral.powerlaw import fit_power_law, hill_alpha


# -- Hill -------------------------------------------------------------------


def test_hill_matches_a_hand_computation():
    x = [1.0, 2.0, 3.0, 4.0, 8.0]
    # n = 5: cut index floor(5/2) = 2 -> tail 3, 4, 8 (k = 3)
    alpha, k = hill_alpha(x)
    assert k == 3
    assert alpha == pytest.approx(1 + 3 / (math.log(3 / 3) + math.log(4 / 3) + math.log(8 / 3)))
    # order, zeros and NaN do not matter; xmin_pos moves the cut
    assert hill_alpha([8.0, 0.0, 3.0, math.nan, 1.0, 4.0, 2.0])[0] == pytest.approx(alpha)
    a4, k4 = hill_alpha(x, xmin_pos=4)  # cut floor(5/4) = 1 -> tail 2..8
    assert k4 == 4 and a4 == pytest.approx(1 + 4 / sum(math.log(v / 2) for v in (2, 3, 4, 8)))


def test_hill_recovers_a_pareto_exponent():
    rng = np.random.default_rng(0)
    for a in (2.5, 4.0):
        x = (1.0 - rng.random(20000)) ** (-1.0 / (a - 1.0))  # density ~ x^-a on [1, inf)
        alpha, k = hill_alpha(x)
        # the upper half of a Pareto sample is Pareto with the same exponent
        assert alpha == pytest.approx(a, abs=4 * (a - 1) / math.sqrt(k))
        assert fit_power_law(x).alpha == pytest.approx(a, rel=0.1)


def test_hill_degenerate_inputs_are_nan():
    assert math.isnan(hill_alpha([])[0])
    assert math.isnan(hill_alpha([1.0])[0])
    assert math.isnan(hill_alpha([2.0, 2.0, 2.0, 2.0])[0])


# -- allocations ------------------------------------------------------------


def _records():
    rng = np.random.default_rng(1)
    out = []
    for i in range(12):
        out.append({"layer": f"model.layers.{i // 3}.p{i % 3}", "alpha_hill": float(2 + 4 * rng.random()),
                    "N": int(rng.integers(64, 512)), "M": 64, "slices": 1})
    return out


def test_sparsity_allocation_hits_the_target_is_monotone_and_bounded():
    recs = _records()
    for s, eps in ((0.7, 0.2), (0.5, 0.0), (0.3, 0.5)):
        al = sparsity_allocation(recs, s, epsilon=eps)
        assert al.weighted_mean() == pytest.approx(s, rel=1e-12)
        rows = sorted(al.rows, key=lambda r: r["alpha"])
        vals = [r["value"] for r in rows]
        assert all(b >= a - 1e-15 for a, b in zip(vals, vals[1:]))  # higher alpha -> higher sparsity
        assert all(0 < v < 1 for v in vals)
        # spread: the ratio of extremes is (1 + eps) / (1 - eps) before the common scaling
        assert vals[-1] / vals[0] == pytest.approx((1 + eps) / (1 - eps))
    p = sum(r["N"] * r["M"] for r in recs)
    assert sum(r["params"] for r in al.rows) == p


def test_sparsity_allocation_handles_nan_alpha_and_blocks():
    recs = _records()
    recs[4]["alpha_hill"] = math.nan
    al = sparsity_allocation(recs, 0.6)
    assert al.skipped == [recs[4]["layer"]]
    assert al.weighted_mean() == pytest.approx(0.6)
    blk = sparsity_allocation(recs, 0.6, blockwise=True)
    v = blk.values
    assert v["model.layers.0.p0"] == v["model.layers.0.p1"] == v["model.layers.0.p2"]
    assert blk.weighted_mean() == pytest.approx(0.6)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan, "0.7"])
def test_bad_sparsity_is_a_user_error(bad):
    with pytest.raises(UserError):
        sparsity_allocation(_records(), bad)


def test_impossible_spread_is_a_user_error():
    with pytest.raises(UserError, match="smaller epsilon"):
        sparsity_allocation(_records(), 0.95, epsilon=0.5)


def test_lr_allocation_is_a_linear_map_of_alpha():
    recs = _records()
    al = lr_allocation(recs, lr_min_ratio=0.5, lr_slope=1.0)
    a = np.array([r["alpha"] for r in al.rows])
    v = np.array([r["value"] for r in al.rows])
    assert v.min() == pytest.approx(0.5) and v.max() == pytest.approx(1.5)
    assert np.allclose(v, 0.5 + (a - a.min()) / (a.max() - a.min()))


def test_allocation_writers_round_trip(tmp_path):
    al = allocate(_records(), "sparsity=0.7,epsilon=0.1")
    j = json.loads(al.write(tmp_path / "a.json").read_text())
    assert j["kind"] == "sparsity" and j["target"] == 0.7
    assert j["values"] == al.values
    rows = list(csv.DictReader(io.StringIO(al.write(tmp_path / "a.csv").read_text())))
    assert [r["layer"] for r in rows] == [r["layer"] for r in al.rows]
    assert [float(r["sparsity"]) for r in rows] == [r["value"] for r in al.rows]


@pytest.mark.parametrize("spec", ["", "sparsity", "sparsity=abc", "sparsity=0.7,bogus=1", "lr,epsilon=0.2", "epsilon=0.1"])
def test_bad_allocate_specs_are_user_errors(spec):
    with pytest.raises(UserError):
        parse_allocate(spec)


# -- layer types ------------------------------------------------------------


@pytest.mark.parametrize("name,kind,expected", [
    ("model.layers.3.self_attn.q_proj", None, "q"),
    ("model.layers.3.self_attn.k_proj.weight", None, "k"),
    ("model.layers.3.self_attn.v_proj", None, "v"),
    ("model.layers.3.self_attn.o_proj", None, "o"),
    ("model.layers.3.mlp.gate_proj", None, "mlp"),
    ("model.layers.3.mlp.down_proj", None, "mlp"),
    ("model.embed_tokens", None, "embedding"),
    ("lm_head", None, "embedding"),
    ("encoder.layer.0.attention.self.query", None, "q"),
    ("encoder.layer.0.attention.output.dense", None, "o"),
    ("encoder.layer.0.intermediate.dense", None, "mlp"),
    ("encoder.layer.0.output.dense", None, "mlp"),
    ("transformer.h.2.attn.c_attn[k]", None, "k"),
    ("transformer.h.2.attn.c_attn", None, "qkv"),
    ("transformer.h.2.attn.c_proj", None, "o"),
    ("transformer.h.2.mlp.c_proj", None, "mlp"),
    ("layer1.0.conv1", None, "conv"),
    ("features.0", "conv2d", "conv"),
    ("features.0", None, "other"),
    ("tok", "embedding", "embedding"),
])
def test_layer_type(name, kind, expected):
    assert layer_type(name, kind) == expected


def test_layer_depth():
    assert layer_depth("model.layers.13.mlp.up_proj") == 13
    assert layer_depth("lm_head") == -1


# -- inline SVG -------------------------------------------------------------


def _coords(svg: str) -> list[float]:
    root = ET.fromstring(svg)
    out = []
    for el in root.iter():
        for k in ("x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "width", "height"):
            if k in el.attrib:
                out.append(float(el.attrib[k]))
        if "points" in el.attrib:
            out += [float(v) for p in el.attrib["points"].split() for v in p.split(",")]
    return out


def test_esd_svg_is_valid_escaped_and_finite():
    rng = np.random.default_rng(0)
    ev = list((1 - rng.random(400)) ** (-1 / 2.5)) + [0.0, math.nan, math.inf, -1.0]
    svg = esd_svg(ev, alpha=3.5, xmin=1.5, xmax=max(e for e in ev if math.isfinite(e)), n_tail=150,
                  title='blk.0 <attn> & "q"')
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert "<attn>" not in svg and "&lt;attn&gt;" in svg
    cs = _coords(svg)
    assert cs and all(math.isfinite(c) for c in cs)
    assert "polyline" in svg  # the fitted line
    assert "nan" not in svg.lower() and "inf" not in svg.lower()


def test_esd_svg_without_a_fit_or_values():
    ET.fromstring(esd_svg([1.0, 2.0, 3.0], title="x"))
    assert "no positive eigenvalues" in esd_svg([0.0, math.nan], title="<y>")
    ET.fromstring(esd_svg([0.0, math.nan], title="<y>"))


def test_scatter_svg_drops_nan_and_groups():
    pts = [(i, (math.nan if i % 5 == 0 else 2 + i % 4), "q" if i % 2 else "mlp<", f"layer {i} & co") for i in range(30)]
    pts.append((math.inf, 3.0, "q", "bad"))
    svg = scatter_svg(pts, title="alpha", xlabel="depth", ylabel="alpha", band=(2, 6))
    root = ET.fromstring(svg)
    circles = [el for el in root.iter() if el.tag.endswith("circle")]
    n_legend = 2
    assert len(circles) == n_legend + sum(1 for i in range(30) if i % 5)
    assert "mlp&lt;" in svg and "&amp; co" in svg
    assert all(math.isfinite(c) for c in _coords(svg))
    ET.fromstring(scatter_svg([(math.nan, 1, "q")], title="empty"))
