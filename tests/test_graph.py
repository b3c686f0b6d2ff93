"""The data-flow Graph the loaders record, the one fx tracer, and the shared channel spaces."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netanatomy
from netanatomy.branches.discovery import discover
from netanatomy.channels import channel_spaces
from netanatomy.dynamics.groups import find_channel_groups
from netanatomy.io import torch_module
from netanatomy.io.trace import TraceError, trace
from netanatomy.model import Graph, OpNode, layer_edges
from netanatomy.synthesis.permute import spec_from_module


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Incept(nn.Module):
    """Three paths (1x1; 1x1 -> 3x3; max-pool -> 1x1) joined by a channel concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b3r = nn.Conv2d(8, 6, 1)
        self.b3 = nn.Conv2d(6, 5, 3, padding=1)
        self.bp = nn.Conv2d(8, 3, 1)
        self.head = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b3(F.relu(self.b3r(x)))), self.bp(F.max_pool2d(x, 3, 1, 1))], 1)
        return self.fc(self.head(F.relu(y)).mean((2, 3)))


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


def _export(net, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False)
        except Exception as exc:  # exporter missing or changed in this torch build
            pytest.skip(f"torch.onnx.export(dynamo=False) unavailable: {type(exc).__name__}")


def _producer(graph: Graph, nid: int) -> str | None:
    """The layer a node's channels come from, walking back through single-input ops."""
    n = graph.node(nid)
    while n.layer is None and len(n.inputs) == 1:
        n = graph.node(n.inputs[0])
    return n.layer


# -- the data flow ------------------------------------------------------------


def test_residual_net_records_adds_pooling_and_flatten():
    m = torch_module.load(_model(ResNet))
    g = m.graph
    assert g.source == "torch.fx" and g.has_flow
    assert [n.id for n in g.nodes] == list(range(len(g.nodes)))
    assert all(i < n.id for n in g.nodes for i in n.inputs)  # topological
    adds = [n for n in g.nodes if n.op == "add"]
    assert len(adds) == 2
    # x + block(x), in argument order: the stream (the stem's norm, then the first
    # sum) and the block's last norm
    assert [_producer(g, i) for i in adds[0].inputs] == ["bn", "blocks.0.b2"]
    assert _producer(g, adds[1].inputs[1]) == "blocks.1.b2"
    first = g.node(adds[1].inputs[0])
    assert first.op == "other" and first.inputs == [adds[0].id]  # relu of the first sum
    assert all(a.channels == 8 for a in adds)
    assert [n.label for n in g.nodes if n.op == "pool"] == ["global_avg_pool"]
    assert [n.op for n in g.nodes if n.label == "flatten"] == ["flatten"]
    assert [n.layer for n in g.nodes if n.op == "layer"] == [l.name for l in m.layers]
    # the layer-to-layer edges are derived from the flow
    assert g.edges == layer_edges(g.nodes)
    edges = {(e.src, e.dst): e.via for e in g.edges}
    assert edges[("bn", "blocks.0.c1")] == ("relu",)
    assert edges[("bn", "blocks.1.c1")] == ("relu", "add", "relu")
    assert edges[("blocks.1.b2", "fc")] == ("add", "relu", "global_avg_pool", "flatten")
    assert sorted(m["blocks.1.c1"].inputs) == ["blocks.0.b2", "bn"]
    assert m.global_pool_after("blocks.1.c2") is True


def test_inception_concat_records_ordered_inputs_and_offsets():
    g = torch_module.load(_model(Incept)).graph
    (cat,) = [n for n in g.nodes if n.op == "concat"]
    assert cat.axis == 1 and cat.channels == 12
    assert [_producer(g, i) for i in cat.inputs] == ["b1", "b3", "bp"]
    assert cat.offsets == [0, 4, 9]
    assert [g.node(i).channels for i in cat.inputs] == [4, 5, 3]


def test_layer_edges_from_a_hand_built_flow():
    nodes = [
        OpNode(0, "input", keeps_channels=False),
        OpNode(1, "layer", [0], layer="a", label="conv2d"),
        OpNode(2, "other", [1], label="relu"),
        OpNode(3, "layer", [2], layer="b", label="conv2d"),
        OpNode(4, "add", [2, 3], label="add"),
        OpNode(5, "pool", [4], label="global_avg_pool"),
        OpNode(6, "layer", [5], layer="c", label="linear"),
    ]
    g = Graph(source="test", nodes=nodes)
    assert {(e.src, e.dst): e.via for e in g.edges} == {
        ("a", "b"): ("relu",),
        ("a", "c"): ("relu", "add", "global_avg_pool"),
        ("b", "c"): ("add", "global_avg_pool"),
    }
    assert g.users()[2] == [3, 4]


def test_one_tracer_keeps_named_leaves_and_reports_failure():
    net = _model(ResNet)
    whole = [n for n in trace(net, {"blocks.0"}).nodes if n.op == "call_module"]
    assert "blocks.0" in [n.target for n in whole] and "blocks.0.c1" not in [n.target for n in whole]

    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow

    with pytest.raises(TraceError) as info:
        trace(Untraceable())
    assert info.value.reason  # a one-line account


# -- branches read the Graph ----------------------------------------------------


def test_discovery_reads_the_recorded_graph_not_the_module(monkeypatch):
    m = torch_module.load(_model(Incept))
    before = [p.to_dict() for p in discover(m).points]
    import netanatomy.io.trace as tr

    def boom(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr(tr, "trace", boom)
    monkeypatch.setattr(torch_module, "trace", boom)
    after = [p.to_dict() for p in discover(m).points]
    assert after == before and [p["kind"] for p in after] == ["concat"]
    assert [b["channels"] for b in after[0]["branches"]] == [[0, 4], [4, 9], [9, 12]]


@pytest.mark.parametrize("cls", [ResNet, Incept])
def test_onnx_export_gives_the_torch_branch_structure(tmp_path, cls):
    pytest.importorskip("onnx")
    net = _model(cls)
    path = tmp_path / f"{cls.__name__}.onnx"
    _export(net, path)
    mo = netanatomy.load(path)
    path.unlink()  # discovery must not re-read the file
    do, dt = discover(mo), discover(torch_module.load(net))
    assert do.graph_source == "onnx" and dt.graph_source == "torch.fx"

    def shape(d, model):  # the export folds the norms into the convolutions: count weight layers
        return [
            (p.kind, [b.channels for b in p.branches], [sum(model[l].kind != "norm" for l in b.layers) for b in p.branches], p.width)
            for p in d.points
        ]

    assert shape(do, mo) == shape(dt, torch_module.load(net))
    assert [p.kind for p in dt.points] == (["add", "add", "residual"] if cls is ResNet else ["concat"])
    if cls is Incept:
        (co,) = [n for n in mo.graph.nodes if n.op == "concat"]
        (ct,) = [n for n in torch_module.load(net).graph.nodes if n.op == "concat"]
        assert co.offsets == ct.offsets == [0, 4, 9]


# -- one channel space --------------------------------------------------------


def _permute_spaces(net, model):
    writers = {l.name for l in model.layers if l.kind in ("conv2d", "linear")}
    spec = spec_from_module(net)
    return sorted(
        sorted(k.removesuffix(".weight") for k, axis, _ in items if axis == 0 and k.removesuffix(".weight") in writers)
        for items in spec.axes.values()
    )


def test_channel_spaces_tie_a_residual_stream():
    m = torch_module.load(_model(ResNet))
    spaces = channel_spaces(m)
    stream = next(s for s in spaces if "stem" in s.writers)
    assert stream.writers == ["stem", "blocks.0.c2", "blocks.1.c2"]
    assert stream.norms == ["bn", "blocks.0.b2", "blocks.1.b2"]
    assert stream.readers == ["blocks.0.c1", "blocks.1.c1", "fc"]
    assert not stream.fixed and stream.size == 8
    fc = next(s for s in spaces if s.writers == ["fc"])
    assert fc.fixed  # reaches the output


@pytest.mark.parametrize("cls", [ResNet, Incept])
def test_dynamics_and_permutation_see_the_same_channel_spaces(cls):
    net = _model(cls)
    m = torch_module.load(net)
    groups = find_channel_groups(m)
    dyn = sorted({tuple(sorted([g.layer, *g.tied])) for g in groups if g.space_fixed is False})
    assert [list(t) for t in dyn] == _permute_spaces(net, m)
    if cls is ResNet:
        assert ["blocks.0.c2", "blocks.1.c2", "stem"] in [list(t) for t in dyn]


def test_channel_groups_unchanged_by_the_space_record():
    """The per-layer groups (norms, outgoing slices) are what they were before the
    spaces were recorded: written out by hand for the residual net."""
    groups = {g.layer: g for g in find_channel_groups(torch_module.load(_model(ResNet)))}
    assert groups["stem"].norm_layers == ["bn"]
    assert [(o.layer, o.mode, o.residual) for o in groups["stem"].outs] == [
        ("blocks.0.c1", "column", False),
        ("blocks.1.c1", "column", True),
        ("fc", "column", True),
    ]
    assert [(o.layer, o.residual) for o in groups["blocks.1.c2"].outs] == [("fc", True)]
    assert groups["blocks.1.c2"].tied == ["stem", "blocks.0.c2"]


def test_no_graph_no_spaces(tmp_path):
    from safetensors.torch import save_file

    net = _model(ResNet)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    m = netanatomy.load(path)
    assert channel_spaces(m) is None
    assert all(g.space_fixed is None and g.tied == [] for g in find_channel_groups(m))


def test_loading_keeps_each_submodule_mode_and_statistics():
    net = _model(ResNet)
    net.train()
    net.bn.eval()
    stats = net.blocks[0].b1.running_mean.clone()
    torch_module.load(net)  # shape propagation runs a dummy input through the net
    assert net.training and not net.bn.training and net.blocks[0].b1.training
    assert torch.equal(net.blocks[0].b1.running_mean, stats)


class Mixer(nn.Module):
    """A softmax over the channels: not a per-channel operation, so the space is fixed."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Softmax(dim=1)
        self.b = nn.Conv2d(6, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.b(self.mix(self.a(x)))
        return self.fc(F.relu(self.c(F.relu(x) * 0.5)).mean((2, 3)))


def test_a_channel_mixing_operation_fixes_the_space_for_both():
    net = _model(Mixer)
    m = torch_module.load(net)
    by_writer = {w: s for s in channel_spaces(m) for w in s.writers}
    assert by_writer["a"].fixed and not by_writer["b"].fixed and not by_writer["c"].fixed
    groups = {g.layer: g for g in find_channel_groups(m)}
    assert groups["a"].space_fixed is True and groups["b"].space_fixed is False
    assert _permute_spaces(net, m) == [["b"], ["c"]]
