"""The layer view, the analysis registry and the stats analysis."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

import netanatomy as na
from netanatomy.analysis import Analysis, LayerwiseAnalysis
from netanatomy.errors import UserError
from netanatomy.stats import tensor_stats


@pytest.mark.parametrize("shape", [(7,), (33, 5), (1000, 37), (4, 3, 3, 3)])
def test_tensor_stats_match_float64_reference(shape):
    torch.manual_seed(0)
    t = torch.randn(*shape) * 3 + 1
    s = tensor_stats(t)
    ref = t.double().reshape(-1)
    q = torch.quantile(ref, torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    for k, v in zip((0, 25, 50, 75, 100), q):
        assert s[f"q{k}"] == pytest.approx(float(v), abs=1e-6)
    assert s["mean"] == pytest.approx(float(ref.mean()), rel=1e-9)
    assert s["std"] == pytest.approx(float(ref.std()), rel=1e-9)
    assert s["fro_norm"] == pytest.approx(float(ref.norm()), rel=1e-9)
    assert s["abs_mean"] == pytest.approx(float(ref.abs().mean()), rel=1e-9)


def test_stats_analysis_records(tiny_cnn):
    m = na.load(tiny_cnn)
    ((analysis, res),) = na.run_analyses(m, ["stats"])
    rec = {r["layer"]: r for r in res.records}
    assert set(rec) == {"conv1", "bn1", "conv2", "dw", "fc"}
    w = tiny_cnn.conv2.weight.detach().double()
    assert rec["conv2"]["fro_norm"] == pytest.approx(float(w.norm()), rel=1e-6)
    unit = w.reshape(16, -1).norm(dim=1)
    assert rec["conv2"]["unit_norm_cv"] == pytest.approx(float(unit.std() / unit.mean()), rel=1e-5)
    assert res.summary["params"] == m.num_params
    assert "bias_mean" in rec["conv1"] and "bias_mean" not in rec["conv2"] or tiny_cnn.conv2.bias is not None


def test_dead_units_counted():
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[1].zero_()
    ((_, res),) = na.run_analyses(na.load(lin), ["stats"])
    assert res.records[0]["dead_units"] == 1 and res.summary["dead_units"] == 1


def test_registry_and_option_coercion():
    assert "stats" in na.available_analyses()
    with pytest.raises(UserError, match="unknown analysis"):
        na.get_analysis("nope")

    @dataclass
    class Opts:
        k: int = 3
        tol: float = 0.5
        flag: bool = False
        mode: Literal["a", "b"] = "a"
        base: str | None = None
        names: tuple = ()

    class A(Analysis):
        name = "tmp"
        Options = Opts

    o = A.make_options({"k": "7", "tol": "1e-3", "flag": "yes", "mode": "b", "base": "none", "names": "x, y"})
    assert (o.k, o.tol, o.flag, o.mode, o.base, o.names) == (7, 1e-3, True, "b", None, ("x", "y"))
    for bad in ({"k": "1.5"}, {"tol": "nan"}, {"flag": "maybe"}, {"mode": "c"}, {"zzz": "1"}):
        with pytest.raises(UserError):
            A.make_options(bad)


def test_one_failing_layer_does_not_stop_the_others(tiny_cnn):
    class Picky(LayerwiseAnalysis):
        name = "picky"

        def analyze_layer(self, layer, options, context):
            if layer.name == "conv2":
                raise ValueError("boom")
            return {"ok": True}

    res = Picky().run(na.load(tiny_cnn))
    errs = res.errors
    assert [e["layer"] for e in errs] == ["conv2"] and errs[0]["error_type"] == "internal"
    assert "boom" in errs[0]["error"]
    assert len(res.ok_records) == 4 and res.summary["layers_failed"] == 1


def test_model_select_and_lookup(tiny_cnn):
    m = na.load(tiny_cnn)
    assert [l.name for l in m.select(kinds=["conv2d"])] == ["conv1", "conv2", "dw"]
    assert m[0].name == "conv1" and "fc" in m and "nope" not in m
    with pytest.raises(KeyError):
        m["nope"]
    with pytest.raises(UserError, match="no layer named"):
        m.select(names=["nope"])
    assert m.to_frame().shape[0] == 5
    assert math.isclose(m.overview()["params"], sum(p.numel() for p in tiny_cnn.parameters()))
