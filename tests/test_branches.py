"""Branch specialization: discovery on grouped / concat / residual models (torch
and ONNX), descriptors, hypergeometric counts, SVD maps, the registered analysis."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netanatomy
from netanatomy.branches import (
    adjust,
    all_in_branch_probability,
    category_tests,
    discover,
    hypergeom_tail,
    kmeans,
    read_labels,
    rgb_categories,
    rgb_descriptors,
    separation_auc,
    svd_maps,
)
from netanatomy.branches.analysis import BranchesOptions, compute
from netanatomy.errors import UserError

# ---------------------------------------------------------------------------
# tiny models


class Grouped(nn.Module):
    """AlexNet-style: conv1 feeds a two-group conv2, then an ungrouped conv3."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5, padding=2)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(24, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class Incept(nn.Module):
    """A stem, one Inception block of four paths joined by concatenation, a conv after."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b3r = nn.Conv2d(16, 6, 1)
        self.b3 = nn.Conv2d(6, 12, 3, padding=1)
        self.b5r = nn.Conv2d(16, 4, 1)
        self.b5 = nn.Conv2d(4, 6, 5, padding=2)
        self.bp = nn.Conv2d(16, 6, 1)
        self.after = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat(
            [
                F.relu(self.b1(x)),
                F.relu(self.b3(F.relu(self.b3r(x)))),
                F.relu(self.b5(F.relu(self.b5r(x)))),
                F.relu(self.bp(F.max_pool2d(x, 3, 1, 1))),
            ],
            dim=1,
        )
        y = F.relu(self.after(y))
        return self.fc(y.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8), Block(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


def _export(model, path):
    """torch.onnx.export with the TorchScript exporter; skip where it is unavailable
    (the hand-built ONNX graph below still covers the ONNX path)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False)
        except Exception as exc:  # exporter missing or changed in this torch build
            pytest.skip(f"torch.onnx.export(dynamo=False) unavailable: {type(exc).__name__}")


def _model(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


def _points(res, kind):
    return [r for r in res.point_records if r["kind"] == kind]


# ---------------------------------------------------------------------------
# statistics


def test_article_probabilities():
    # all 9 of 9 black-and-white vs colour detectors in mixed3a_5x5 (32 of 256)
    p1 = all_in_branch_probability(9, 32, 256)
    assert p1 == pytest.approx(2.5e-9, rel=0.02)
    assert hypergeom_tail(9, 256, 32, 9) == pytest.approx(p1, rel=1e-6)
    assert p1 < 1e-8  # the article's "less than 1/10^8"
    # all 30 of 30 curve features in mixed3b_5x5 (96 of 480)
    p2 = all_in_branch_probability(30, 96, 480)
    assert p2 == pytest.approx(1.7e-23, rel=0.03)
    assert hypergeom_tail(30, 480, 96, 30) == pytest.approx(p2, rel=1e-6)
    assert p2 < 1e-20


def test_hypergeom_tail_general_and_sentence():
    # 14 of 16 colour filters in a branch of 24 of 48: tail equals the explicit sum
    from math import comb

    exact = sum(comb(16, k) * comb(32, 24 - k) for k in range(14, 17)) / comb(48, 24)
    assert hypergeom_tail(14, 48, 24, 16) == pytest.approx(exact, rel=1e-9)
    cats = ["colour"] * 14 + ["grey"] * 10 + ["colour"] * 2 + ["grey"] * 22
    br = [0] * 24 + [1] * 24
    tests = category_tests("colour", cats, br, ["branch 0", "branch 1"], unit="filters")
    t = next(t for t in tests if t.category == "colour" and t.branch == 0)
    assert (t.count, t.total, t.branch_size, t.expected) == (14, 16, 24, 8.0)
    assert t.sentence().startswith("branch 0 holds 14 of 16 colour filters (expected 8.0), p = ")


def test_corrections():
    p = [0.01, 0.04, 0.03, 0.5]
    assert adjust(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 1.0])
    assert adjust(p, "holm") == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert adjust(p, "bh") == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert adjust(p, "none") == p


# ---------------------------------------------------------------------------
# descriptors


def _planted_filters(n_grey=8, n_colour=8, k=5, seed=0):
    """Grey high-frequency gratings, then colour low-frequency blobs."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(k, dtype=torch.float32), torch.arange(k, dtype=torch.float32), indexing="ij")
    grey = []
    for i in range(n_grey):
        wave = torch.cos(math.pi * (xx if i % 2 else yy) + 0.1 * i)  # alternating stripes
        grey.append(wave.expand(3, k, k) * (1 + 0.1 * torch.rand(1, generator=g)))
    colour = []
    for i in range(n_colour):
        c = torch.zeros(3, 1, 1)
        c[i % 3] = 1.0
        c[(i + 1) % 3] = -0.5
        blob = torch.exp(-((xx - 2) ** 2 + (yy - 2) ** 2) / 4)
        colour.append(c * blob + 0.01 * torch.randn(3, k, k, generator=g))
    return torch.stack(grey + colour)


def test_rgb_descriptors_colour_frequency_orientation():
    w = _planted_filters()
    d = rgb_descriptors(w)
    assert np.all(d.colourfulness[:8] < 0.05)
    assert np.all(d.colourfulness[8:] > 0.6)
    assert d.frequency[:8].min() > d.frequency[8:].max()
    # stripes varying along x (vertical stripes) vs along y: wave vectors 90 degrees apart
    assert abs(((d.orientation[1] - d.orientation[0]) % 180) - 90) < 10
    assert d.orientedness[:8].min() > 0.8
    cats = rgb_categories(d)
    assert list(cats["colour"][:8]) == ["grey"] * 8 and list(cats["colour"][8:]) == ["colour"] * 8
    assert set(cats["frequency"][:8]) == {"high"}


def test_kmeans_recovers_blobs():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(20, 5, generator=g) * 0.1 + 3, torch.randn(12, 5, generator=g) * 0.1 - 3])
    lab = kmeans(x, 2, seed=0)
    assert len(set(lab[:20])) == 1 and len(set(lab[20:])) == 1 and lab[0] != lab[20]
    assert lab[0] == 0  # the largest cluster is called 0


def test_read_labels(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("layer,neuron,category\nconv1,0,curve\nconv1,3,curve\nconv2,1,colour\n")
    lab = read_labels(p)
    assert lab.for_layer("conv1") == {0: "curve", 3: "curve"}
    bad = tmp_path / "bad.csv"
    bad.write_text("conv1,zero,curve\n")
    with pytest.raises(UserError, match="integer"):
        read_labels(bad)
    with pytest.raises(UserError, match="no such"):
        read_labels(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------
# discovery


def test_grouped_conv_model():
    m = netanatomy.load(_model(Grouped))
    res = compute(m)
    pts = _points(res, "groups")
    by_layer = {p["layer"]: p for p in pts}
    assert set(by_layer) == {"conv1", "conv2"}
    inputs = by_layer["conv1"]  # conv1's channels, split by conv2's groups (the towers)
    assert [b["channels"] for b in inputs["branches"]] == [[0, 8], [8, 16]]
    assert inputs["branches"][1]["layers"] == ["conv1[8:16]", "conv2[12:24]"]
    assert {"colour", "frequency", "in_cluster"} <= set(inputs["descriptors"])
    assert "out_cluster" not in inputs["descriptors"]  # conv2's weights are the split itself
    outputs = by_layer["conv2"]
    assert [b["channels"] for b in outputs["branches"]] == [[0, 12], [12, 24]]
    assert outputs["consumers"] == ["conv3"]
    assert outputs["descriptors"] == ["out_cluster"]
    # every test row carries counts that add up
    for t in inputs["tests"]:
        assert 0 <= t["count"] <= min(t["total"], t["branch_size"])
        assert 0 <= t["p"] <= 1 and t["p_adjusted"] >= t["p"] - 1e-12
    assert [(p.layer1, p.layer2) for p in res.pairs] == [("conv2", "conv3")]


def test_concat_model():
    m = netanatomy.load(_model(Incept))
    res = compute(m)
    (pt,) = _points(res, "concat")
    assert [b["channels"] for b in pt["branches"]] == [[0, 8], [8, 20], [20, 26], [26, 32]]
    assert [b["layers"] for b in pt["branches"]] == [["b1"], ["b3r", "b3"], ["b5r", "b5"], ["bp"]]
    assert [s["layer"] for s in pt["segments"]] == ["b1", "b3", "b5", "bp"]
    assert pt["consumers"] == ["after"] and pt["width"] == 32 and pt["layer"] == "after"
    assert "out_cluster" in pt["descriptors"]
    # the stem is shared by all branches: it belongs to none
    assert all("stem" not in b["layers"] for b in pt["branches"])
    assert ("stem", "b1") in [(p.layer1, p.layer2) for p in res.pairs]
    assert ("b3", "after") not in [(p.layer1, p.layer2) for p in res.pairs]  # through a concat


def test_residual_model():
    m = netanatomy.load(_model(Res))
    res = compute(m)
    adds = _points(res, "add")
    assert len(adds) == 3
    assert adds[1]["branches"][0]["layers"] == ["blocks.1.c1", "blocks.1.c2"]
    assert adds[1]["branches"][1]["name"] == "skip" and adds[1]["branches"][1]["layers"] == []
    assert adds[1]["branches"][0]["channels"] == [0, 8] == adds[1]["branches"][1]["channels"]
    (stage,) = _points(res, "residual")
    assert len(stage["branches"]) == 3 and stage["neurons"] == 24
    assert [s["layer"] for s in stage["segments"]] == ["blocks.0.c1", "blocks.1.c1", "blocks.2.c1"]
    assert {"in_cluster", "out_cluster"} <= set(stage["descriptors"])


@pytest.mark.parametrize("cls", [Incept, Res])
def test_onnx_export_matches_torch(tmp_path, cls):
    pytest.importorskip("onnx")
    torch_model = _model(cls)
    path = tmp_path / f"{cls.__name__}.onnx"
    _export(torch_model, path)
    res_onnx = compute(netanatomy.load(path))
    res_torch = compute(netanatomy.load(torch_model))
    assert res_onnx.discovery.graph_source == "onnx"

    def shape(res):  # ONNX layer names may differ (folded norms): compare the structure
        return sorted(
            (p["kind"], tuple(tuple(b["channels"]) for b in p["branches"]), tuple(len(b["layers"]) for b in p["branches"]))
            for p in res.point_records
        )

    assert shape(res_onnx) == shape(res_torch)
    assert len(res_onnx.pairs) == len(res_torch.pairs)


def test_onnx_grouped_export(tmp_path):
    pytest.importorskip("onnx")
    path = tmp_path / "g.onnx"
    _export(_model(Grouped), path)
    res = compute(netanatomy.load(path))
    assert {p["layer"] for p in _points(res, "groups")} == {"conv1", "conv2"}


class Untraceable(Grouped):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        if float(x.sum()) > 0:
            x = -x
        return super().forward(x)


def test_hand_built_onnx_concat(tmp_path):
    """An ONNX graph made with onnx.helper (no exporter): two paths concatenated."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "a.weight"], ["a_out"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a_out"], ["a_relu"]),
        helper.make_node("Conv", ["x", "b.weight"], ["b_out"]),
        helper.make_node("Concat", ["a_relu", "b_out"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "c.weight"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_paths",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8, 8])],
        [init("a.weight", 4, 3, 3, 3), init("b.weight", 6, 3, 1, 1), init("c.weight", 5, 10, 3, 3)],
    )
    path = tmp_path / "two_paths.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    res = compute(netanatomy.load(path))
    (pt,) = _points(res, "concat")
    assert [b["channels"] for b in pt["branches"]] == [[0, 4], [4, 10]]
    assert [b["layers"] for b in pt["branches"]] == [["a"], ["b"]]
    assert pt["consumers"] == ["c"]
    # both paths are first-layer filters on the image: RGB descriptors apply to all 10
    assert {"colour", "frequency"} <= set(pt["descriptors"])
    assert "in_cluster" in pt["descriptors"]  # both read the same tensor (the image)
    assert "out_cluster" in pt["descriptors"]


def test_no_graph_falls_back_to_groups():
    m = netanatomy.load(_model(Untraceable))
    assert m.graph is None
    d = discover(m)
    assert d.graph_source is None
    assert any("no graph" in n and "grouped" in n for n in d.notes)
    assert [p.kind for p in d.points] == ["groups"] and d.points[0].layer == "conv2"
    res = compute(m)
    assert res.point_records[0]["descriptors"] == []  # no consumer known without a graph
    assert any("no graph" in n for n in res.notes)


def test_state_dict_without_graph_says_so(tmp_path):
    path = tmp_path / "g.pt"
    torch.save(_model(Grouped).state_dict(), path)
    d = discover(netanatomy.load(path))
    assert d.points == [] and any("no graph" in n for n in d.notes)
    # the SVD maps still come from consecutive conv layers
    assert [(p.layer1, p.layer2) for p in compute(netanatomy.load(path)).pairs] == [("conv2", "conv3")]


# ---------------------------------------------------------------------------
# planted specialization: the test knows the answer


def _planted_grouped():
    net = _model(Grouped)
    with torch.no_grad():
        w = _planted_filters(8, 8)  # channels 0-7 grey gratings, 8-15 colour blobs
        net.conv1.weight.copy_(w)
    return net


def test_planted_specialization_found():
    net = _planted_grouped()
    res = compute(netanatomy.load(net))
    rec = next(p for p in res.point_records if p["layer"] == "conv1")
    assert rec["specialized"]
    colour = next(t for t in rec["tests"] if t["descriptor"] == "colour" and t["category"] == "colour" and t["branch"] == 1)
    assert (colour["count"], colour["total"], colour["expected"]) == (8, 8, 4.0)
    assert colour["p"] == pytest.approx(1 / math.comb(16, 8), rel=1e-6)
    assert colour["p_adjusted"] < 0.05
    assert colour["sentence"].startswith("group 1 holds 8 of 8 colour filters (expected 4.0), p = ")
    high = next(t for t in rec["tests"] if t["descriptor"] == "frequency" and t["category"] == "high-frequency" and t["branch"] == 0)
    assert high["count"] == high["total"] == 8
    mwu = next(c for c in rec["continuous"] if c["descriptor"] == "colourfulness" and c["branch"] == 0)
    assert mwu["mwu_p"] < 0.001


def test_random_model_not_specialized():
    res = compute(netanatomy.load(_model(Grouped, seed=3)))
    rec = next(p for p in res.point_records if p["layer"] == "conv1")
    assert not rec["specialized"]


def test_planted_svd_separates_colour_from_grey():
    """conv2 reads the colour filters with one half of its neurons and the grey
    filters with the other: SV1 (uncentred) and SV0 (centred) follow colour."""

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 5, padding=2)
            self.conv2 = nn.Conv2d(16, 20, 3, padding=1)

        def forward(self, x):
            return self.conv2(F.relu(self.conv1(x)))

    torch.manual_seed(0)
    net = Plain()
    with torch.no_grad():
        net.conv1.weight.copy_(_planted_filters(8, 8))
        w2 = 0.05 * torch.randn(20, 16, 3, 3)
        w2[:10, 8:] += torch.sign(torch.randn(10, 8, 3, 3))  # colour filters -> conv2 0-9
        w2[10:, :8] += torch.sign(torch.randn(10, 8, 3, 3))  # grey filters -> conv2 10-19
        net.conv2.weight.copy_(w2)
    res = compute(netanatomy.load(net))
    (pm,) = res.pairs
    r = {(c["variant"], c["sv"], c["descriptor"]): c["r"] for c in pm.correlations}
    assert abs(r[("uncentred", 1, "colourfulness")]) > 0.95
    assert abs(r[("centred", 0, "colourfulness")]) > 0.95
    assert np.all(pm.maps["uncentred"].left[:, 0] > 0)  # the Perron vector
    colour = res.rgb["conv1"].colourfulness > 0.5
    assert separation_auc(pm.maps["uncentred"].left[:, 1], colour) == 1.0
    # orientedness separates the planted groups as well (gratings vs blobs)
    assert pm.headline().startswith(("SV0 (centred)", "SV1 (uncentred)"))


def test_svd_maps_shapes_and_signs():
    w2 = torch.rand(6, 10, 3, 3)
    maps = svd_maps(w2, k=3)
    assert maps["uncentred"].left.shape == (10, 3) and maps["uncentred"].right.shape == (6, 3)
    m = w2.abs().sum((2, 3)).t().double().numpy()
    mp = maps["uncentred"]
    approx = mp.left @ np.diag(mp.singular_values) @ mp.right.T
    full = np.linalg.svd(m, compute_uv=False)
    assert np.allclose(mp.singular_values, full[:3])
    assert np.linalg.norm(m - approx) <= np.sqrt((full[3:] ** 2).sum()) + 1e-6


def test_user_labels_counted(tmp_path):
    p = tmp_path / "labels.csv"
    rows = ["layer,neuron,category"] + [f"conv1,{i},curve" for i in range(8, 14)] + [f"conv1,{i},other" for i in range(0, 6)]
    p.write_text("\n".join(rows) + "\n")
    res = compute(netanatomy.load(_model(Grouped)), BranchesOptions(labels=str(p)))
    rec = next(p for p in res.point_records if p["layer"] == "conv1")
    t = next(t for t in rec["tests"] if t["descriptor"] == "label" and t["category"] == "curve" and t["branch"] == 1)
    assert (t["count"], t["total"], t["population"]) == (6, 6, 12)


def test_bad_options():
    m = netanatomy.load(_model(Grouped))
    with pytest.raises(UserError):
        compute(m, BranchesOptions(correction="magic"))
    with pytest.raises(UserError):
        compute(m, BranchesOptions(clusters=1))


def test_nonfinite_layer_does_not_abort():
    net = _planted_grouped()
    with torch.no_grad():
        net.conv3.weight[0, 0, 0, 0] = float("nan")
    res = compute(netanatomy.load(net))
    assert any(e["layer"] == "conv3" for e in res.errors)
    rec = next(p for p in res.point_records if p["layer"] == "conv1")
    assert rec["specialized"]  # the other layers still analysed


# ---------------------------------------------------------------------------
# registered analysis, CLI and report


def test_analyze_cli_writes_json_and_report(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("matplotlib")
    from netanatomy.cli import main

    path = tmp_path / "planted.onnx"
    _export(_planted_grouped(), path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(path), "--only", "branches", "--out", str(out)])
    assert exc.value.code == 0
    doc = json.loads((out / "branches.json").read_text())
    recs = doc["records"]
    assert all("layer" in r for r in recs)
    points = [r for r in recs if r["record"] == "branch_point"]
    conv1 = next(r for r in points if r["layer"] == "conv1")
    assert conv1["specialized"] and "8 of 8 colour filters" in conv1["best"]
    assert any(r["record"] == "svd" and r["layer"] == "conv3" and r["correlations"] for r in recs)
    html = (out / "report.html").read_text()
    assert "Branch specialization" in html and "SVD map" in html and "data:image/png;base64" in html


def test_analyze_cli_bad_option(tmp_path, capsys):
    from netanatomy.cli import main

    path = tmp_path / "g.pt"
    torch.save(_model(Grouped).state_dict(), path)
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(path), "--only", "branches", "--set", "branches.correction=magic", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "correction" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["smoke", "smoke_alexstem"])
def test_experiment_smoke_config_runs(tmp_path, name):
    """The smoke configurations of ``netanatomy experiment branches`` run end to end on the offline photos."""
    from netanatomy.cli import main
    from netanatomy.experiments.branches import CONFIGS, load_photos

    cfg = CONFIGS[name]
    if len(load_photos(cfg.short_side)[0]) < 4:
        pytest.skip("fewer than 4 offline photographs (wallpaper packages, scikit-image)")
    assert cfg.short_side * 0.2 >= cfg.crop  # the held-out strip of a square photo holds one crop
    out = tmp_path / "br"
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "branches", "--config", name, "--out", str(out)])
    assert exc.value.code == 0
    doc = json.loads((out / "branches_runs.json").read_text())
    assert len(doc["runs"]) == 2 and (out / "branches.md").is_file()
