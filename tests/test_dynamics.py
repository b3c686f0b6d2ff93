"""Width sufficiency: rule, tracker, post-hoc mode, plan, rebuilt model, CLI."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from netanatomy.dynamics import WidthRecord, WidthTracker, curves_from_checkpoints
from netanatomy.dynamics.plan import make_plan
from netanatomy.dynamics.rebuild import apply_plan, count_flops, count_params
from netanatomy.dynamics.rule import DS, IS, UNDECIDED, RuleOptions, classify_curve
from netanatomy.dynamics.width import analyze_record, spearman

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def resnet(c=8, mid=4):
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(1, c, 3, padding=1),
            bn=nn.BatchNorm2d(c),
            act=nn.ReLU(),
            b1=Block(c),
            b2=Block(c),
            narrow=nn.Conv2d(c, mid, 3, padding=1),
            act2=nn.ReLU(),
            head=nn.Conv2d(mid, 12, 3, stride=2),
            act3=nn.ReLU(),
            gap=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(12, 5),
        )
    )


def cnn_flatten():
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 6, 3),
            act=nn.ReLU(),
            conv2=nn.Conv2d(6, 5, 3),
            act2=nn.ReLU(),
            flat=nn.Flatten(),
            fc1=nn.Linear(5 * 4 * 4, 7),
            act3=nn.ReLU(),
            fc2=nn.Linear(7, 3),
        )
    )


def train_steps(model, tracker, steps=6, epochs=2, shape=(4, 1, 8, 8), seed=0, n_out=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for _ in range(steps):
            x = torch.randn(*shape, generator=g)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if tracker is not None:
                tracker.step()
        if tracker is not None:
            tracker.epoch_end({"loss": loss.detach()})


# --------------------------------------------------------------------------- rule
def _x(n=41):
    return np.arange(n, dtype=float)


def test_rule_synthetic_ds_is_flat():
    rng = np.random.default_rng(0)
    x = _x()
    rise = 0.2 * (1 - np.exp(-x / 2))
    ds = 0.01 + rise * np.exp(-np.maximum(x - 8, 0) / 8) + rng.normal(0, 0.003, len(x))
    ds[0] = 0.01
    is_ = 0.02 + 0.45 * (1 - np.exp(-x / 5)) + rng.normal(0, 0.005, len(x))
    flat = 0.05 + rng.normal(0, 0.004, len(x))
    v_ds, v_is, v_flat = classify_curve(x, ds), classify_curve(x, is_), classify_curve(x, flat)
    assert v_ds.label == DS and v_ds.confidence > 0.8
    assert v_is.label == IS and v_is.confidence > 0.8
    assert v_flat.label == UNDECIDED
    assert any("noise" in r or "floor" in r for r in v_flat.reasons)


def test_rule_amplitude_floor_and_tau():
    x = _x(30)
    # the floor is relative to the curve's top: the same DS shape reads DS at any amplitude,
    # a curve moving by 5 % of its level reads undecided at any amplitude
    shape = np.exp(-((x - 5) / 3) ** 2)
    for a in (0.015, 0.3, 30.0):
        assert classify_curve(x, a * (0.05 + shape)).label == DS
        assert classify_curve(x, a * (1 + 0.05 * shape)).label == UNDECIDED
    # a 20% sag from the peak: IS at tau 0.3, DS at tau 0.15
    sag = np.concatenate([np.linspace(0, 0.5, 8), np.linspace(0.5, 0.4, 22)])
    assert classify_curve(x, sag, RuleOptions(tau=0.3)).label == IS
    assert classify_curve(x, sag, RuleOptions(tau=0.15)).label == DS


def test_rule_short_curve_and_nan():
    x = _x(30)
    assert classify_curve(x[:3], [0, 1, 0]).label == UNDECIDED
    v = 0.02 + 0.45 * (1 - np.exp(-x / 5))
    v[7] = np.nan  # a missing point is dropped, not a verdict changer
    assert classify_curve(x, v).label == IS


def test_spearman():
    assert spearman(np.arange(5), np.arange(5) * 3) == pytest.approx(1.0)
    assert spearman(np.arange(5), -np.arange(5)) == pytest.approx(-1.0)


def _real_curves():
    found = sorted((ROOT / "results").glob("width_curves_*.json"))
    if not found:
        pytest.skip("no experiment curves in results/")
    return {k: v for f in found for k, v in json.loads(f.read_text()).items()}


def test_rule_on_real_curves():
    """The experiments' real curves (results/width_curves_*.json, Fashion-MNIST; MLP
    784-256-X-128-10 for 30 epochs, CNN conv-pool-convX-pool-conv-GAP-FC for 12):
    at the default constants the wide middle layer reads IS and the narrow one,
    which rises, peaks and falls, reads DS. The output layers (width fixed by the
    task) are not asserted: their small early bump reads DS in some runs."""
    curves = _real_curves()
    nets = [(a, m) for a, m in (("mlp", "fc2"), ("cnn", "conv2")) if f"{a}_narrow/{m}" in curves]
    if not nets:
        pytest.skip("no experiment curves")
    for arch, middle in nets:
        n, w = curves[f"{arch}_narrow/{middle}"], curves[f"{arch}_wide/{middle}"]
        vw = classify_curve(w["x"], w["v"])
        vn = classify_curve(n["x"], n["v"])
        assert vw.label == IS and vn.label == DS, arch
        assert vn.final / vn.peak < vw.final / vw.peak - 0.15
        # every other hidden layer reads IS, narrow run or wide
        for key, c in curves.items():
            run, layer = key.split("/")
            if run.startswith(arch + "_") and layer not in ("out", "fc") and key != f"{arch}_narrow/{middle}":
                assert classify_curve(c["x"], c["v"]).label == IS, key


# --------------------------------------------------------------------------- tracker
def test_groups_follow_norms_residuals_and_flatten():
    torch.manual_seed(0)
    m = resnet()
    tr = WidthTracker(m)
    g = {x.layer: x for x in tr.groups}
    assert g["stem"].norm_layers == ["bn"]
    outs = {o.layer for o in g["stem"].outs}
    assert {"b1.c1", "b2.c1", "narrow"} <= outs  # through the residual adds
    assert g["b1.c2"].residual
    assert [o.layer for o in g["narrow"].outs] == ["head"]
    assert not g["fc"].outs
    g2 = {x.layer: x for x in WidthTracker(cnn_flatten()).groups}
    assert g2["conv2"].outs[0].mode == "flatten" and g2["conv2"].outs[0].positions == 16


def test_tracker_values_match_direct_computation():
    torch.manual_seed(0)
    m = cnn_flatten()
    tr = WidthTracker(m, every=2)
    w0 = {k: v.detach().clone() for k, v in m.state_dict().items()}
    train_steps(m, tr, steps=4, epochs=2)
    rec = tr.record()
    # conv2: incoming filter norm x outgoing slice norm in fc1 (flattened 5 x 16)
    w_in = m.conv2.weight.detach()
    w_out = m.fc1.weight.detach().reshape(7, 5, 16)
    norms = w_in.reshape(5, -1).norm(dim=1) * w_out.permute(1, 0, 2).reshape(5, -1).norm(dim=1)
    row = rec.curves[(rec.curves.layer == "conv2") & (rec.curves.kind == "epoch")].iloc[-1]
    np.testing.assert_allclose(row["norms"], norms.numpy(), rtol=1e-5)
    assert row["var_ratio"] == pytest.approx(float(norms.var(unbiased=True) / norms.mean()), rel=1e-5)
    changed = (torch.signbit(w_in) != torch.signbit(w0["conv2.weight"])).float().mean()
    assert row["sign_changed"] == pytest.approx(float(changed))
    # conv: outgoing slice is a column of conv2
    c_norm = m.conv.weight.detach().reshape(6, -1).norm(dim=1) * m.conv2.weight.detach().transpose(0, 1).reshape(6, -1).norm(dim=1)
    row = rec.curves[(rec.curves.layer == "conv") & (rec.curves.kind == "epoch")].iloc[-1]
    np.testing.assert_allclose(row["norms"], c_norm.numpy(), rtol=1e-5)
    # schedule: init + 4 step points (every 2 of 8 steps) + 2 epochs, per layer
    kinds = rec.curves[rec.curves.layer == "conv"]["kind"].tolist()
    assert kinds.count("init") == 1 and kinds.count("step") == 4 and kinds.count("epoch") == 2
    assert rec.curves.loc[rec.curves.kind == "init", "sign_changed"].eq(0).all()
    assert list(rec.metrics["name"]) == ["loss", "loss"]
    assert tr.positions["conv2"] == 16 and tr.positions["fc1"] == 1
    assert any(s["layer"] == "conv" and s["epoch"] == 1 for s in rec.similarity)
    sim = next(s["matrix"] for s in rec.similarity if s["layer"] == "conv")
    assert sim.shape == (6, 6) and np.allclose(np.diag(sim), 1, atol=1e-5)


def test_tracker_residual_norm_sums_every_successor():
    torch.manual_seed(0)
    m = resnet()
    tr = WidthTracker(m)
    rec = tr.record()
    sd = m.state_dict()
    out_sq = sum(sd[f"{k}.weight"].transpose(0, 1).reshape(8, -1).square().sum(1) for k in ("b1.c1", "b2.c1", "narrow"))
    expect = sd["stem.weight"].reshape(8, -1).norm(dim=1) * out_sq.sqrt()
    got = rec.curves[rec.curves.layer == "stem"].iloc[0]["norms"]
    np.testing.assert_allclose(got, expect.numpy(), rtol=1e-5)


def test_resume_continues_curves(tmp_path):
    torch.manual_seed(0)
    m = cnn_flatten()
    tr = WidthTracker(m, every=3)
    train_steps(m, tr, steps=4, epochs=2, seed=1)
    torch.save({"model": m.state_dict(), "tracker": tr.state_dict()}, tmp_path / "ck.pt")
    # reference: keep going uninterrupted
    train_steps(m, tr, steps=4, epochs=2, seed=2)
    ref = tr.record().curves
    # resumed: a new model and tracker from the checkpoint
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m2 = cnn_flatten()
    m2.load_state_dict(ck["model"])
    tr2 = WidthTracker(m2, every=3)
    tr2.load_state_dict(ck["tracker"])
    train_steps(m2, tr2, steps=4, epochs=2, seed=2)
    got = tr2.record().curves
    assert len(got) == len(ref)
    assert list(got["epoch"]) == list(ref["epoch"]) and list(got["step"]) == list(ref["step"])
    np.testing.assert_allclose(got["var_ratio"], ref["var_ratio"], rtol=1e-4)
    # sign changes are still measured against the first run's init
    np.testing.assert_allclose(got["sign_changed"], ref["sign_changed"], atol=1e-6)
    assert got["sign_changed"].max() > 0
    with pytest.raises(ValueError):
        WidthTracker(resnet()).load_state_dict(ck["tracker"])


def test_internal_error_disables_without_raising(monkeypatch):
    torch.manual_seed(0)
    m = cnn_flatten()
    tr = WidthTracker(m, every=1)

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(tr, "compute_point", boom)
    with pytest.warns(RuntimeWarning, match="disabled.*injected"):
        train_steps(m, tr, steps=3, epochs=2)
    assert not tr.enabled and "injected" in tr.disabled_reason
    tr.step()
    tr.epoch_end()
    assert len(tr.record().curves) == 4  # the init point only, one row per layer


def test_attach_failure_disables():
    with pytest.warns(RuntimeWarning, match="disabled"):
        tr = WidthTracker(nn.Sequential(nn.ReLU()))
    assert not tr.enabled
    tr.step()
    tr.epoch_end()


def test_record_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = cnn_flatten()
    tr = WidthTracker(m)
    train_steps(m, tr, steps=2, epochs=3)
    tr.save(tmp_path / "run")
    rec = WidthRecord.load(tmp_path / "run")
    ref = tr.record()
    assert list(rec.curves["layer"]) == list(ref.curves["layer"])
    np.testing.assert_allclose(np.stack(rec.curves["norms"].map(lambda v: v[:3])),
                               np.stack(ref.curves["norms"].map(lambda v: np.asarray(v[:3]))), rtol=1e-6)
    assert len(rec.similarity) == len(ref.similarity)
    assert rec.meta["positions"]["conv2"] == 16


def test_posthoc_equals_online(tmp_path):
    torch.manual_seed(0)
    m = resnet()
    tr = WidthTracker(m, similarity_epochs=())
    ck = tmp_path / "ckpts"
    ck.mkdir()
    torch.save(m.state_dict(), ck / "epoch_000.pt")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(1, 4):
        for _ in range(3):
            loss = m(torch.randn(4, 1, 8, 8, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        tr.epoch_end()
        torch.save(m.state_dict(), ck / f"epoch_{epoch:03d}.pt")
    online = tr.record().curves
    with_module = curves_from_checkpoints(ck, resnet(), similarity_epochs=()).curves
    np.testing.assert_allclose(with_module["var_ratio"], online["var_ratio"], rtol=1e-5)
    np.testing.assert_allclose(with_module["sign_changed"], online["sign_changed"], atol=1e-7)
    assert list(with_module["epoch"]) == list(online["epoch"])
    # without a module: sequential guess of successors; same for a sequential model
    torch.manual_seed(1)
    s = cnn_flatten()
    tr2 = WidthTracker(s)
    ck2 = tmp_path / "seq"
    ck2.mkdir()
    torch.save(s.state_dict(), ck2 / "e0.pt")
    opt = torch.optim.SGD(s.parameters(), lr=0.05)
    for epoch in range(1, 3):
        loss = s(torch.randn(4, 1, 8, 8, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tr2.epoch_end()
        torch.save(s.state_dict(), ck2 / f"e{epoch}.pt")
    bare = curves_from_checkpoints(ck2).curves
    np.testing.assert_allclose(bare["var_ratio"], tr2.record().curves["var_ratio"], rtol=1e-5)


# --------------------------------------------------------------------------- plan + rebuild
def _analysis_with(record, verdicts, bottleneck=()):
    a = analyze_record(record)
    for r in a.layers:
        r["verdict"] = verdicts.get(r["layer"], UNDECIDED)
        r["bottleneck"] = r["layer"] in bottleneck
    return a


def test_plan_holds_flops_and_rebuilds_resnet():
    torch.manual_seed(0)
    m = resnet(c=16, mid=4)
    tr = WidthTracker(m)
    x = torch.randn(2, 1, 12, 12)
    m(x)
    rec = tr.record()
    verdicts = {n: IS for n in ("stem", "b1.c1", "b1.c2", "b2.c1", "b2.c2", "head")}
    verdicts["narrow"] = DS
    plan = make_plan(_analysis_with(rec, verdicts, {"narrow"}), rec.meta)
    lay = {r["layer"]: r for r in plan["layers"]}
    assert lay["narrow"]["new_width"] == 8 and lay["narrow"]["action"] == "widen"
    assert lay["fc"]["action"] == "fixed"
    # residual stream shares one width
    assert lay["stem"]["new_width"] == lay["b1.c2"]["new_width"] == lay["b2.c2"]["new_width"]
    assert lay["stem"]["tie_group"] == lay["b2.c2"]["tie_group"] != lay["b1.c1"]["tie_group"]
    assert any(lay[n]["new_width"] < 16 for n in verdicts if n not in ("narrow", "head"))
    assert abs(plan["flops_ratio"] - 1) < 0.05
    for init in ("fresh", "inherit"):
        new = apply_plan(m, plan, init=init)
        assert new(x).shape == (2, 5)
        # the plan's own FLOPs and parameter counts match the rebuilt model's
        assert count_flops(new, x) == plan["flops_after"]
        assert count_params(new) == plan["params_after"]
    assert count_flops(m, x) == plan["flops_before"]
    assert m.narrow.out_channels == 4  # the input module is not modified


def test_plan_ds_spread_widens_only_the_bottleneck():
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(a=nn.Linear(10, 32), r1=nn.ReLU(), b=nn.Linear(32, 4), r2=nn.ReLU(),
                                  c=nn.Linear(4, 32), r3=nn.ReLU(), d=nn.Linear(32, 3)))
    tr = WidthTracker(m)
    # curves: the narrow layer and its feeder both fall from a peak
    x = np.arange(20.0)
    ds = 0.3 * np.exp(-((x - 3) / 2) ** 2) + 0.05 * (x > 3)
    ds[0] = 0.0
    is_ = 0.4 * (1 - np.exp(-x / 3))
    rec = tr.record()
    rows = []
    for layer, curve in (("a", ds), ("b", ds), ("c", is_), ("d", is_)):
        for xi, vi in zip(x, curve):
            rows.append({"kind": "init" if xi == 0 else "epoch", "step": int(xi), "epoch": int(xi), "layer": layer,
                         "channels": {"a": 32, "b": 4, "c": 32, "d": 3}[layer], "norm_mean": 1.0, "var_ratio": vi,
                         "sign_changed": 0.1, "norms": np.linspace(1, 2, {"a": 32, "b": 4, "c": 32, "d": 3}[layer])})
    import pandas as pd

    rec.curves = pd.DataFrame(rows)
    a = analyze_record(rec)
    by = {r["layer"]: r for r in a.layers}
    assert by["a"]["verdict"] == DS and by["b"]["verdict"] == DS
    assert by["b"]["bottleneck"] and by["a"]["ds_neighbour_of"] == "b"
    plan = make_plan(a, rec.meta)
    lay = {r["layer"]: r for r in plan["layers"]}
    assert lay["b"]["new_width"] == 8
    assert lay["a"]["new_width"] == 32 and "next to bottleneck" in lay["a"]["reason"]
    assert lay["c"]["new_width"] < 32
    assert abs(plan["flops_ratio"] - 1) < 0.05
    new = apply_plan(m, plan)
    assert new(torch.randn(3, 10)).shape == (3, 3)


def test_inherit_widening_preserves_function():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(7, 5)
    wide = apply_plan(m, {"2": 7}, init="inherit", noise=0.0)
    assert wide[2].out_features == 7 and wide[4].in_features == 7
    torch.testing.assert_close(wide(x), m(x), rtol=1e-5, atol=1e-6)
    narrow = apply_plan(m, {"0": 4}, init="inherit")
    assert narrow(x).shape == (7, 2) and narrow[0].out_features == 4
    # a conv read through Flatten by a Linear: the column blocks move with the channel
    c = cnn_flatten()
    xi = torch.randn(2, 1, 8, 8)
    cw = apply_plan(c, {"conv2": 9}, init="inherit", noise=0.0)
    assert cw.fc1.in_features == 9 * 16
    torch.testing.assert_close(cw(xi), c(xi), rtol=1e-5, atol=1e-6)


def test_plan_refuses_bad_changes():
    from netanatomy.errors import UserError

    m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(UserError):
        apply_plan(m, {"2": 4})  # the output layer
    with pytest.raises(UserError):
        apply_plan(m, {"nope": 4})


# --------------------------------------------------------------------------- CLI
def _run_cli(args):
    from netanatomy.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def test_cli_width_on_run_and_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    m = cnn_flatten()
    tr = WidthTracker(m)
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(m.state_dict(), ck / "epoch_0.pt")
    for e in range(1, 7):
        train_steps(m, None, steps=2, epochs=1, seed=e)
        tr.epoch_end()
        torch.save(m.state_dict(), ck / f"epoch_{e}.pt")
    tr.save(tmp_path / "run")
    out = tmp_path / "out"
    assert _run_cli(["width", str(tmp_path / "run"), "--out", str(out)]) == 0
    plan = json.loads((out / "width_plan.json").read_text())
    assert plan["format"] == "netanatomy.width-plan/1"
    assert (out / "report.html").read_text().count("<img") >= 3
    assert (out / "width_verdicts.parquet").exists()
    assert _run_cli(["width", str(ck), "--out", str(tmp_path / "out2"), "--no-report"]) == 0
    assert (tmp_path / "out2" / "curves" / "width_curves.parquet").exists()
    capsys.readouterr()
    assert _run_cli(["width", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert _run_cli(["width", str(tmp_path / "run"), "--tau", "2", "--out", str(out)]) == 2
    assert _run_cli(["experiment", "width", "--config", "huge", "--out", str(tmp_path / "x")]) == 2
    assert "--config is one of" in capsys.readouterr().err


def test_stages_locate_growth():
    from netanatomy.dynamics.rule import stages

    x = np.arange(20.0)
    v = np.concatenate([np.zeros(4), np.linspace(0, 1, 6), np.ones(10)])
    sign = np.linspace(0, 0.3, 20)
    st = stages(x, v, sign)
    assert 3 <= st["early_end"] <= 6 and 7 <= st["growth_end"] <= 10
    assert st["sign_changed_at_5"] == pytest.approx(sign[5])


def test_experiment_pipeline_tiny(tmp_path, monkeypatch):
    """The experiment end to end on a tiny config (pipeline only, not the effect)."""
    from netanatomy.datasets import fashion_mnist_available
    from netanatomy.experiments import width as E

    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed")
    tiny = E.ExperimentConfig("tiny", [E.NetConfig("mlp", 4, 16, epochs=4, train_n=256)], seeds=1, eval_n=128,
                              tau=0.3)
    monkeypatch.setitem(E.CONFIGS, "tiny", tiny)
    logs = []
    s = E.run_experiment("tiny", tmp_path, log=logs.append)
    assert set(s["runs"]) == {"mlp_narrow", "mlp_wide"}
    p = s["plans"]["mlp"]
    assert p["tau"] == 0.3  # a config's tau reaches the plan's verdicts
    assert len(p["original"]) == len(p["planned"]) == 1
    assert (tmp_path / "width_mlp_curves.png").exists() and (tmp_path / "curves_mlp.json").exists()
    assert (tmp_path / "mlp_narrow" / "width_curves.parquet").exists()
    # a second call reuses the finished runs
    E.run_experiment("tiny", tmp_path, log=logs.append)
    assert any("reusing" in line for line in logs)
