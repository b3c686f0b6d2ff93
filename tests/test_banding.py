"""Weight banding: NMF, alignment, scores, types, the analysis and the experiment smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from netanatomy.banding.core import (
    align_colours,
    analyse_weight,
    band_scores,
    banding_score,
    classify,
    kmeans,
    null_v,
    similarity_order,
)
from netanatomy.banding.nmf import nmf_batched, posneg, reduce_kernels


def _banded(n=48, c=16, k=3, axis="h", noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, c, k, 1, generator=g).expand(n, c, k, k)
    w = rows + noise * torch.randn(n, c, k, k, generator=g)
    return w if axis == "h" else w.transpose(2, 3).contiguous()


# -- scores -----------------------------------------------------------------


def test_scores_exact_on_pure_stripes():
    p = torch.zeros(2, 3, 3, 1)
    p[0, :, :, 0] = torch.tensor([1.0, 2.0, 5.0]).view(3, 1)  # constant along x: horizontal stripes
    p[1, :, :, 0] = torch.tensor([1.0, 2.0, 5.0]).view(1, 3)  # vertical stripes
    vy, vx = band_scores(p)
    assert vy[0] == pytest.approx(1.0) and vx[0] == pytest.approx(0.0, abs=1e-12)
    assert vy[1] == pytest.approx(0.0, abs=1e-12) and vx[1] == pytest.approx(1.0)
    h, v = classify(vy, vx)
    assert h.tolist() == [True, False] and v.tolist() == [False, True]


def test_null_value_matches_iid_average():
    g = torch.Generator().manual_seed(0)
    for kh, kw in [(3, 3), (5, 5), (3, 5)]:
        vy, vx = band_scores(torch.randn(20000, kh, kw, 3, generator=g))
        ny, nx = null_v(kh, kw)
        assert float(vy.mean()) == pytest.approx(ny, abs=0.01)
        assert float(vx.mean()) == pytest.approx(nx, abs=0.01)
    assert null_v(3, 3) == (0.25, 0.25)
    assert banding_score(0.25, 0.25, 3, 3) == 0.0
    assert banding_score(1.0, 0.0, 3, 3) == pytest.approx(1.0)


@pytest.mark.parametrize("axis,orientation", [("h", "horizontal"), ("v", "vertical")])
def test_synthetic_banded_layers(axis, orientation):
    lb = analyse_weight("x", _banded(axis=axis))
    r = lb.record
    assert r["orientation"] == orientation
    hi, lo = ("v_y_median", "v_x_median") if axis == "h" else ("v_x_median", "v_y_median")
    assert r[hi] > 0.95 and r[lo] < 0.05
    assert r["banded_fraction"] > 0.95
    assert all(name == orientation for name in lb.type_names)
    assert sum(lb.type_shares) == pytest.approx(1.0)


def test_iid_layer_is_not_banded():
    g = torch.Generator().manual_seed(1)
    r = analyse_weight("x", torch.randn(128, 32, 3, 3, generator=g)).record
    assert r["orientation"] == "none"
    assert r["banded_fraction"] < 0.15
    assert abs(r["v_y_median"] - 0.25) < 0.08 and abs(r["v_x_median"] - 0.25) < 0.08


def test_depthwise_kernels_are_pictured_directly():
    w = _banded(n=12, c=1, axis="h", noise=0.0)
    lb = analyse_weight("dw", w, depthwise=True)
    assert lb.method == "direct" and "nmf_rel_error" not in lb.record
    assert lb.record["orientation"] == "horizontal"


# -- NMF ----------------------------------------------------------------------


def test_posneg_is_nonnegative_and_lossless():
    w = torch.randn(4, 5, 3, 3)
    x = posneg(w)
    assert x.shape == (4, 9, 10) and (x >= 0).all()
    back = (x[:, :, :5] - x[:, :, 5:]).transpose(1, 2).reshape(4, 5, 3, 3)
    assert torch.equal(back, w)


def test_nmf_matches_sklearn_quality():
    sk = pytest.importorskip("sklearn.decomposition")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, 5, 5, generator=g) + 0.8 * torch.randn(24, 32, 5, 1, generator=g)
    ours = reduce_kernels(w, k=3, tol=1e-5, max_iter=500)
    X = posneg(w).numpy().astype(np.float64)
    errs = []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(X.shape[0]):
            m = sk.NMF(n_components=3, init="nndsvda", solver="cd", max_iter=500)
            m.fit_transform(X[i])
            errs.append(m.reconstruction_err_)
    theirs = float(np.mean(errs))
    assert ours.mean_error <= theirs * 1.01
    # the error we report is the real one
    A = ours.A.reshape(24, 25, 3)
    direct = (posneg(w) - A @ ours.B).flatten(1).norm(dim=1)
    assert torch.allclose(direct, ours.err, rtol=1e-3)
    assert (ours.A >= 0).all() and (ours.B >= 0).all()


def test_nmf_recovers_exact_low_rank():
    g = torch.Generator().manual_seed(3)
    A = torch.rand(10, 9, 3, generator=g)
    B = torch.rand(10, 3, 40, generator=g)
    res = nmf_batched(A @ B, k=3, tol=0, max_iter=300)
    rel = res.err / (A @ B).flatten(1).norm(dim=1)
    assert float(rel.max()) < 0.02


def test_nmf_rejects_negative_input():
    with pytest.raises(ValueError):
        nmf_batched(-torch.ones(2, 4, 4), k=2)


# -- alignment, ordering, k-means --------------------------------------------


def test_alignment_undoes_colour_permutations():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 3, 3, generator=g)  # one picture pattern (kh, kw, 3)
    perms = [torch.randperm(3, generator=g) for _ in range(20)]
    pics = torch.stack([base[..., p] * (0.5 + torch.rand(1, generator=g)) for p in perms])
    aligned, idx, _ = align_colours(pics)
    ref = aligned[0] / aligned[0].max()
    for i in range(20):
        assert torch.allclose(aligned[i] / aligned[i].max(), ref, atol=1e-5)


def test_similarity_order_groups_similar_neurons():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(27, generator=g), torch.randn(27, generator=g)
    feats = torch.stack([a + 0.05 * torch.randn(27, generator=g) if i % 2 else b + 0.05 * torch.randn(27, generator=g) for i in range(20)])
    order = similarity_order(feats)
    groups = [i % 2 for i in order]
    assert sum(groups[j] != groups[j + 1] for j in range(len(groups) - 1)) == 1
    assert sorted(order.tolist()) == list(range(20))


def test_kmeans_separates_clusters_and_sorts_by_size():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 2, generator=g) * 0.1 + 5, torch.randn(10, 2, generator=g) * 0.1 - 5])
    km = kmeans(x, k=2)
    assert (km.labels[:30] == 0).all() and (km.labels[30:] == 1).all()
    assert np.allclose(km.centres[0], [5, 5], atol=0.1)


# -- the registered analysis -------------------------------------------------


class _GapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 5, padding=2)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


class _GapNet3(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_analysis_on_tiny_gap_model_marks_last_conv():
    import netanatomy
    from netanatomy.analysis import run_analyses
    from netanatomy.report.render import render

    torch.manual_seed(0)
    m = _GapNet3()
    with torch.no_grad():  # make the last conv horizontally banded
        m.features[3].weight.copy_(_banded(n=16, c=8, axis="h"))
    model = netanatomy.load(m)
    (analysis, result), = run_analyses(model, ["banding"])
    recs = {r["layer"]: r for r in result.records}
    assert len(recs) == 2 and not result.errors
    last = model.last_conv_before_global_pool()
    assert last is not None and recs[last.name]["last_conv_before_global_pool"]
    assert recs[last.name]["orientation"] == "horizontal" and recs[last.name]["rank"] == 1
    assert result.summary["last_conv_before_global_pool"] == last.name
    for key in ("layer", "banded_fraction", "orientation", "v_y_median", "v_x_median", "type0_share"):
        assert key in recs[last.name]
    blocks = render(analysis, result)
    assert blocks


def test_analysis_skips_1x1_and_survives_bad_layer(tmp_path):
    import netanatomy
    from netanatomy.analysis import run_analyses

    torch.manual_seed(0)
    m = _GapNet()
    with torch.no_grad():
        m.c1.weight[0, 0, 0, 0] = float("nan")
    model = netanatomy.load(m)
    (_, result), = run_analyses(model, ["banding"])
    names = [r["layer"] for r in result.records]
    assert "c3" not in names  # 1x1 kernels have no spatial structure
    errs = {r["layer"] for r in result.errors}
    assert errs == {"c1"}
    ok = {r["layer"] for r in result.ok_records}
    assert ok == {"c2"}


def test_cli_analyze_writes_banding_json(tmp_path):
    from typer.testing import CliRunner

    from netanatomy.cli import app

    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(_GapNet3().state_dict(), path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(path), "--only", "banding", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "banding.json").read_text())
    rec = data["records"][0]
    for key in ("layer", "banded_fraction", "orientation", "v_y_median", "v_x_median", "type0_share"):
        assert key in rec


# -- the experiment ----------------------------------------------------------


def test_scenes_are_deterministic_and_labelled():
    from netanatomy.experiments.scenes import CLASSES, make_scenes

    a, la = make_scenes(8, 28, torch.Generator().manual_seed(5))
    b, lb = make_scenes(8, 28, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (8, 3, 28, 28) and int(la.max()) < len(CLASSES)
    # paired classes share their materials in a different vertical order
    mats = [set(c[1]) for c in CLASSES]
    assert all(sum(m == other for other in mats) == 2 for m in mats)


def test_experiment_quick_smoke(tmp_path):
    from netanatomy.experiments.banding import CONFIGS, SimplifiedNet, run_experiment

    net = SimplifiedNet((4, 4, 4, 4, 4, 4), (3,) * 6, "xpool", 56)
    assert net.final == 7 and net.fc.in_features == 4 * 7
    torch.set_num_threads(1)
    res = run_experiment("quick", tmp_path)
    md = (tmp_path / "banding_quick.md").read_text()
    assert (tmp_path / "banding_quick_grids.png").exists() or "![" not in md
    assert "netanatomy experiment banding --config quick" in md
    assert {f["intervention"] for f in res.findings} == set(CONFIGS["quick"].interventions)
    shares = res.joint_types["shares"]
    assert all(abs(sum(s) - 1) < 1e-9 for s in shares.values())
    # cached runs are reused, not retrained
    res2 = run_experiment("quick", tmp_path, interventions=("baseline",))
    assert res2.runs["baseline"]["train_seconds"] == res.runs["baseline"]["train_seconds"]


def test_bad_options_are_user_errors():
    import netanatomy
    from netanatomy.analysis import get_analysis
    from netanatomy.errors import UserError

    model = netanatomy.load(_GapNet3())
    cls = get_analysis("banding")
    for key, val in (("band_min", "1.5"), ("k_types", "0"), ("margin", "-0.1")):
        with pytest.raises(UserError):
            cls().run(model, cls.make_options({key: val}))


def test_reduce_kernels_matches_dense_posneg_path():
    # reduce_kernels works on P = relu(W) and W without building the posneg matrix;
    # it must give the same factorisation as the dense path on posneg(W).
    torch.manual_seed(3)
    w = torch.randn(6, 5, 3, 3)
    a = reduce_kernels(w, k=3, tol=0, max_iter=40)
    b = nmf_batched(posneg(w), k=3, tol=0, max_iter=40)
    assert torch.allclose(a.A.reshape(6, 9, 3), b.A, atol=1e-4, rtol=1e-3)
    assert torch.allclose(a.err, b.err, atol=1e-4, rtol=1e-3)
    direct = (posneg(w) - a.A.reshape(6, 9, 3) @ a.B).flatten(1).norm(dim=1)
    assert torch.allclose(direct, a.err, atol=1e-4, rtol=1e-3)


def test_topbottom_label_is_the_vertical_order_of_two_strata():
    from netanatomy.experiments.scenes import _BASE, TB_CLASSES, make_topbottom

    n, size = 64, 56
    x, y, lay = make_topbottom(n, size, torch.Generator().manual_seed(2), return_layout=True)
    assert x.shape == (n, 3, size, size) and int(y.max()) < len(TB_CLASSES)
    # paired classes: same two materials, opposite order
    for i in range(0, len(TB_CLASSES), 2):
        assert TB_CLASSES[i][1] == TB_CLASSES[i + 1][1][::-1]
    up, lo = lay["upper"], lay["lower"]
    assert float((up * lo).sum()) == 0
    rows = torch.arange(size).float().view(1, 1, size, 1)
    # the upper stratum lies above the lower one, a tall clutter band between them
    low_edge_of_upper = (up * rows).flatten(1).max(1).values
    top_edge_of_lower = (lo * rows + (1 - lo) * 1e9).flatten(1).min(1).values
    assert bool((top_edge_of_lower - low_edge_of_upper > 0.15 * size).all())
    # the material in the upper stratum is the class's first one
    img = x / 2 + 0.5
    right = 0
    for i in range(n):
        a, b = TB_CLASSES[int(y[i])][1]
        mean_up = (img[i] * up[i]).flatten(1).sum(1) / up[i].sum()
        right += int((mean_up - _BASE[a]).norm() < (mean_up - _BASE[b]).norm())
    assert right >= 0.85 * n
    # labels given explicitly are honoured, and the two classes of a pair put the other material on top
    x2, y2, lay2 = make_topbottom(8, size, torch.Generator().manual_seed(3), labels=torch.tensor([0, 1] * 4),
                                  return_layout=True)
    assert y2.tolist() == [0, 1] * 4
    a, b = TB_CLASSES[0][1]
    img2 = x2 / 2 + 0.5
    tops = [(img2[i] * lay2["upper"][i]).flatten(1).sum(1) / lay2["upper"][i].sum() for i in range(8)]
    nearer_a = [bool((t - _BASE[a]).norm() < (t - _BASE[b]).norm()) for t in tops]
    assert sum(nearer_a[0::2]) >= 3 and sum(nearer_a[1::2]) <= 1


def test_fashion_photos_on_a_canvas():
    from netanatomy.experiments.scenes import FASHION_CLASSES, make_fashion
    from netanatomy.datasets import fashion_mnist_available

    if not fashion_mnist_available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    a, la = make_fashion(6, 56, torch.Generator().manual_seed(1))
    b, lb = make_fashion(6, 56, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (6, 3, 56, 56) and int(la.max()) < len(FASHION_CLASSES)
    _, lc = make_fashion(3, 56, torch.Generator().manual_seed(1), labels=torch.tensor([9, 0, 5]), split="test")
    assert lc.tolist() == [9, 0, 5]


def test_batches_rotate_and_flip():
    from dataclasses import replace

    from netanatomy.experiments.banding import CONFIGS, make_batch

    cfg = replace(CONFIGS["quick"], data="topbottom", flip=False)
    up, yu = make_batch(cfg, 5, False, torch.Generator().manual_seed(3))
    rot, yr = make_batch(cfg, 5, True, torch.Generator().manual_seed(3))
    assert torch.equal(yu, yr)
    assert torch.equal(rot, torch.rot90(up, 1, dims=(2, 3)))
    # a quarter turn: the top row becomes the left column (read bottom to top)
    assert torch.equal(rot[:, :, :, 0], up[:, :, 0, :].flip(2))
    cf = replace(cfg, flip=True)
    fl, _ = make_batch(cf, 16, False, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4))
    pl, _ = make_batch(cfg, 16, False, torch.Generator().manual_seed(3))
    flipped = [bool(torch.equal(fl[i], pl[i].flip(2))) for i in range(16)]
    kept = [bool(torch.equal(fl[i], pl[i])) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 16


def test_saved_weights_rescore_without_training(tmp_path):
    from dataclasses import replace

    from netanatomy.experiments.banding import (
        CONFIGS,
        initial_weights,
        load_run,
        run_experiment,
        train_one,
        weights_path,
    )
    from netanatomy.errors import UserError

    torch.set_num_threads(1)
    # a run with no steps keeps the initial weights, which initial_weights rebuilds
    cfg0 = replace(CONFIGS["quick"], steps=0, test_size=4)
    run0 = train_one(cfg0, "xpool")
    init = initial_weights(cfg0)
    assert all(torch.equal(run0["weights"][k], init[k]) for k in init)
    cfg = replace(CONFIGS["quick"], steps=2, test_size=16, interventions=("baseline",))
    with pytest.raises(UserError):
        run_experiment(cfg, tmp_path, rescore=True, write=False)
    res = run_experiment(cfg, tmp_path, write=False)
    f = weights_path(tmp_path / "banding_weights", cfg, "baseline")
    assert f.exists()
    _, run = load_run(f)
    assert run["accuracy"] == res.runs["baseline"]["accuracy"]
    assert torch.equal(run["weights"]["5b"], res.runs["baseline"]["weights"]["5b"])
    res2 = run_experiment(cfg, tmp_path, rescore=True, write=False)
    r1, r2 = res.layers[("baseline", "5b")].record, res2.layers[("baseline", "5b")].record
    assert r1["v_y_median"] == pytest.approx(r2["v_y_median"])
    assert ("baseline", "5b") in res2.updates
    # a different config's weights are not silently reused for rescoring
    with pytest.raises(UserError):
        run_experiment(replace(cfg, lr=0.01), tmp_path, rescore=True, write=False)


def test_cli_rescore_user_errors(tmp_path, capsys):
    from netanatomy.cli import main

    for extra, msg in ((["--rescore", "--retrain"], "exclude"), (["--rescore"], "no saved weights")):
        with pytest.raises(SystemExit) as exc:
            main(["experiment", "banding", "--config", "quick", "--out", str(tmp_path), *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    wdir = tmp_path / "banding_weights"
    assert not wdir.exists() or not any(wdir.iterdir())  # nothing was trained
    # a corrupt or foreign weights file: one line, exit 2, the file is left as it was
    from safetensors.torch import save_file

    wdir.mkdir(exist_ok=True)
    bad = wdir / "quick_baseline.safetensors"
    for content in (b"\x00" * 300, None):
        if content is None:
            save_file({"fc.weight": torch.zeros(2, 2)}, str(bad))
        else:
            bad.write_bytes(content)
        before = bad.read_bytes()
        with pytest.raises(SystemExit) as exc:
            main(["experiment", "banding", "--config", "quick", "--out", str(tmp_path), "--rescore"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "not a banding weights file" in err and "Traceback" not in err and err.count("\n") == 1
        assert bad.read_bytes() == before
