"""The Analysis base owns the loop: hook order, failed rows, threads, no state
on the instance, the common summary, and rendering from report/render.py."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import pytest
import torch

import netanatomy as na
from netanatomy.analysis import Analysis, AnalysisResult, available_analyses, get_analysis, run_analyses
from netanatomy.report.blocks import Table
from netanatomy.report.render import get_renderer, register_renderer, render


@dataclass
class Log:
    model: object
    calls: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class RecOptions:
    fail: str = ""  # layer whose analyze_layer raises
    workers: int = 1


class Recorder(Analysis):
    name = "recorder"
    Options = RecOptions

    def prepare(self, model, options):
        log = Log(model)
        log.calls.append("prepare")
        return log

    def select_layers(self, model, options, context):
        context.calls.append("select_layers")
        return [l for l in model.layers if l.kind != "norm"]

    def layer_workers(self, layers, options, context):
        return options.workers

    def analyze_layer(self, layer, options, context):
        with context.lock:
            context.calls.append(("layer", layer.name))
        if layer.name == options.fail:
            raise RuntimeError(f"cannot read {layer.name}")
        return {"numel": layer.weight().numel(), "threads": torch.get_num_threads()}

    def summarize(self, records, options, context):
        context.calls.append(("summarize", len(records)))
        return {"total": sum(r["numel"] for r in records)}

    def finalize(self, result, context):
        context.calls.append("finalize")
        result.extras["calls"] = list(context.calls)
        result.summary["finalized"] = True


def test_hooks_run_in_order(tiny_cnn):
    model = na.load(tiny_cnn)
    res = Recorder().run(model)
    calls = res.extras["calls"]
    layers = [l.name for l in model.layers if l.kind != "norm"]
    assert calls == ["prepare", "select_layers", *[("layer", n) for n in layers], ("summarize", len(layers)), "finalize"]
    assert [r["layer"] for r in res.records] == layers
    assert res.summary["total"] == sum(l.weight().numel() for l in model.layers if l.kind != "norm")
    assert res.summary["finalized"] is True


@pytest.mark.parametrize("workers", [1, 3])
def test_a_raising_layer_is_a_failed_row_and_the_others_go_on(tiny_cnn, workers):
    model = na.load(tiny_cnn)
    res = Recorder().run(model, RecOptions(fail="conv2", workers=workers))
    layers = [l.name for l in model.layers if l.kind != "norm"]
    assert [r["layer"] for r in res.records] == layers  # model order, also from threads
    (err,) = res.errors
    assert err["layer"] == "conv2" and err["error_type"] == "internal" and "cannot read conv2" in err["error"]
    assert len(res.ok_records) == len(layers) - 1
    assert res.summary["layers_failed"] == 1 and res.summary["layers_analysed"] == len(layers) - 1
    assert ("summarize", len(layers) - 1) in res.extras["calls"]  # summarize sees only the good rows


class Meeting(Analysis):
    """Every layer waits for another one: finishes only when layers really run at once."""

    name = "meeting"

    def prepare(self, model, options):
        return threading.Barrier(2, timeout=20)

    def layer_workers(self, layers, options, context):
        return 2

    def select_layers(self, model, options, context):
        return list(model.layers)[:4]

    def analyze_layer(self, layer, options, context):
        context.wait()
        return {"threads": torch.get_num_threads()}


def test_threaded_layers_run_at_once_with_one_torch_thread_and_restore_it(tiny_cnn):
    before = torch.get_num_threads()
    res = Meeting().run(na.load(tiny_cnn))
    assert not res.errors, res.errors
    assert [r["threads"] for r in res.records] == [1, 1, 1, 1]
    assert torch.get_num_threads() == before


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float) and math.isnan(x[k]):
                assert math.isnan(y[k]), k
            else:
                assert x[k] == y[k], (x["layer"], k)


def test_threaded_equals_serial(tiny_cnn):
    model = na.load(tiny_cnn)
    esd = get_analysis("esd")()
    serial = esd.run(model, esd.make_options({"workers": "1", "randomize": "true"}))
    threaded = esd.run(model, esd.make_options({"workers": "3", "randomize": "true"}))
    _same(_without_time(serial.records), _without_time(threaded.records))
    assert serial.summary == threaded.summary
    assert serial.extras["spectra"].keys() == threaded.extras["spectra"].keys()
    r1 = Recorder().run(model, RecOptions(workers=1))
    r3 = Recorder().run(model, RecOptions(workers=3))
    assert [r["numel"] for r in r1.records] == [r["numel"] for r in r3.records]


def test_no_state_is_left_on_the_instance(tiny_cnn, tmp_path):
    model = na.load(tiny_cnn)
    for name in ("stats", "esd", "banding", "branches"):
        analysis = get_analysis(name)()
        assert vars(analysis) == {}
        first = analysis.run(model)
        assert vars(analysis) == {}, name
        again = analysis.run(model)
        assert vars(analysis) == {}, name
        _same(_without_time(first.records), _without_time(again.records))
    # a base model given to one run is not used by the next
    base = tmp_path / "base.pt"
    torch.save(tiny_cnn.state_dict(), base)
    esd = get_analysis("esd")()
    delta = esd.run(model, esd.make_options({"base": str(base)}))
    assert all(r.get("error") or r["fit_reason"] for r in delta.records)  # W - W = 0: nothing to fit
    plain = esd.run(model)
    assert any(math.isfinite(r["alpha"]) for r in plain.ok_records)


def test_summary_timing_options_and_progress(tiny_cnn):
    model = na.load(tiny_cnn)
    seen = []
    res = Recorder().run(model, progress=lambda label, done, total: seen.append((label, done, total)))
    n = len(res.records)
    assert res.analysis == "recorder" and res.seconds > 0
    assert res.options == {"fail": "", "workers": 1}
    assert res.summary["layers_analysed"] == n and res.summary["layers_failed"] == 0
    assert seen == [(r["layer"], i, n) for i, r in enumerate(res.records)] + [("", n, n)]
    for _, result in run_analyses(model, ["stats", "esd", "banding", "branches"]):
        assert {"layers_analysed", "layers_failed"} <= set(result.summary)
        assert result.seconds > 0 and result.options


def test_no_builtin_analysis_overrides_run():
    for name in available_analyses():
        cls = get_analysis(name)
        assert cls.run is Analysis.run, name
        assert not hasattr(cls, "render"), name


def test_rendering_is_looked_up_by_name(tiny_cnn):
    model = na.load(tiny_cnn)
    for name in ("stats", "esd", "banding", "branches"):
        assert get_renderer(name) is not None, name
    (_, res), = run_analyses(model, ["stats"])
    assert render("stats", res) and render(get_analysis("stats")(), res)
    plain = AnalysisResult("nobody-renders-me", records=[{"layer": "a", "x": 1}])
    (block,) = render("nobody-renders-me", plain)
    assert isinstance(block, Table) and block.rows == [{"layer": "a", "x": 1}]

    @register_renderer("nobody-renders-me")
    def _mine(result):
        return ["mine", len(result.records)]

    try:
        assert render("nobody-renders-me", plain) == ["mine", 1]
    finally:
        import sys

        sys.modules["netanatomy.report.render"]._RENDERERS.pop("nobody-renders-me")


def test_branches_keeps_its_points_when_one_layer_raises(monkeypatch):
    import test_branches as tb

    from netanatomy.branches import analysis as ba

    model = na.load(tb._planted_grouped())
    (_, good), = run_analyses(model, ["branches"])
    svd_layers = {r["layer"] for r in good.records if r["record"] == "svd"}
    assert svd_layers and not good.errors

    def broken(*args, **kwargs):
        raise RuntimeError("svd exploded")

    monkeypatch.setattr(ba, "svd_maps", broken)
    (_, res), = run_analyses(model, ["branches"])
    failed = [r for r in res.records if r.get("error")]
    assert {r["layer"] for r in failed} == svd_layers
    assert all(r["record"] == "error" and "svd exploded" in r["error"] for r in failed)
    points = lambda r: [p for p in r.records if p["record"] == "branch_point" and p["layer"] not in svd_layers]
    assert points(res) and points(res) == points(good)  # the other layers' p-values are untouched
    assert res.summary["layers_failed"] == len(svd_layers)
