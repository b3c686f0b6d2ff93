"""``netanatomy align``: a permutation spec inferred from weights alone (plain chains),
refusals of what a state dict cannot describe, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from netanatomy.errors import UserError
from netanatomy.synthesis import align, apply_permutation, interpolate, random_permutations, spec_from_module
from netanatomy.synthesis.chain import infer_chain, spec_from_state
from netanatomy.io import open_store

from test_synthesis_align import ResNetish
from test_synthesis_cli import assert_one_line_error, run


def mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 4))


class PlainCNN(nn.Module):
    """conv-bn-relu-pool, conv-bn-relu, flatten of a 2x2 map, linear, linear (names sort bn before conv)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def input_bn_mlp():
    """A norm on the network's input: a fixed space, never permuted with a hidden layer of its width."""
    return nn.Sequential(nn.BatchNorm1d(10), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))


class DeclaredOutOfOrder(nn.Module):
    """conv1, conv2, bn1, bn2 declared in that order: key order is not the forward order."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _randomize_bn(net):
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)


def _state(net):
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "make, shape, fmt",
    [(mlp, (5, 10), "pt"), (PlainCNN, (3, 1, 8, 8), "safetensors"), (input_bn_mlp, (5, 10), "pt")],
)
def test_align_command_undoes_a_known_permutation(tmp_path, capsys, make, shape, fmt):
    torch.manual_seed(0)
    net = make()
    _randomize_bn(net)
    a = _state(net)
    spec = spec_from_state(a)
    b = {k: v.contiguous() for k, v in apply_permutation(spec, random_permutations(spec, seed=3), a).items()}
    assert any(not torch.equal(a[k], b[k]) for k in a)
    pa, pb = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
    if fmt == "pt":
        torch.save(a, pa)
        torch.save(b, pb)
    else:
        save_file(a, pa)
        save_file(b, pb)
    out, mid = tmp_path / "b_aligned.safetensors", tmp_path / "mid.safetensors"
    code, stdout, err = run(["align", pa, pb, "--out", out, "--average", mid, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["objective_after"] > doc["objective_before"]
    assert doc["l2_distance_after"] == 0.0
    got = load_file(out)
    assert set(got) == set(a)
    for k in a:
        assert torch.equal(got[k], a[k]), k
    for k, v in load_file(mid).items():
        torch.testing.assert_close(v, a[k], rtol=0, atol=1e-6)
    if fmt == "safetensors":  # the barrier before/after with an evaluation command
        import sys

        from test_synthesis import PURE_PYTHON_EVAL

        script = tmp_path / "ev.py"
        script.write_text(PURE_PYTHON_EVAL)  # prints minus the squared norm: loss-like along the path
        code, stdout, err = run(["align", pa, pb, "--out", tmp_path / "o2.safetensors", "--json", "--points", "3",
                                 "--eval", f"{sys.executable} {script}"], capsys)
        assert code == 0, err
        doc = json.loads(stdout)
        assert doc["barrier_naive"] > 0 and doc["barrier_aligned"] == pytest.approx(0.0, abs=1e-6)
    # the aligned file computes the same function as B
    twin_b, twin_al = make().eval(), make().eval()
    twin_b.load_state_dict(b)
    twin_al.load_state_dict(got)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(twin_al(x), twin_b(x), rtol=1e-5, atol=1e-5)


def test_chain_matches_the_module_spec_for_a_plain_cnn():
    net = PlainCNN()
    chain, spec = infer_chain(open_store(net.state_dict()))
    assert [l.name for l in chain.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert [l.norms for l in chain.layers] == [["bn1"], ["bn2"], [], []]
    assert chain.layers[2].inner == 4  # flatten of 6 x 2 x 2
    assert spec.sizes == {"conv1": 8, "conv2": 6, "fc1": 16}
    ref = spec_from_module(net)
    as_set = lambda s: {frozenset(items) for items in s.axes.values()}  # noqa: E731
    assert as_set(spec) == as_set(ref)


def test_python_api_infers_the_chain_or_uses_a_loaded_module():
    import netanatomy
    from netanatomy.experiments.soups import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN((4, 6, 8))
    _randomize_bn(net)
    a = _state(net)
    spec = spec_from_state(a)
    as_set = lambda s: {frozenset(items) for items in s.axes.values()}  # noqa: E731
    assert as_set(spec) == as_set(spec_from_module(net))
    b = apply_permutation(spec, random_permutations(spec, seed=4), a)
    for how in (None, netanatomy.load(net)):
        res = align(a, b, spec=how)
        assert res.distance_after == 0.0 < res.distance_before


def test_order_found_by_shapes_when_names_sort_out_of_order():
    # safetensors readers sort keys: "classifier" comes before "features"
    class VGGish(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 7, 3), nn.ReLU())
            self.classifier = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 2))

    sd = dict(sorted(VGGish().state_dict().items()))
    chain, spec = infer_chain(open_store(sd))
    assert chain.order == "shapes"
    assert [l.name for l in chain.layers] == ["features.0", "features.3", "classifier.0", "classifier.2"]
    assert chain.layers[0].norms == ["features.1"]


def _train_mlp(seed, x, y, steps=80):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add overhead
    try:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return net


def test_independently_trained_pair_objective_and_barrier(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR-like quadrants
    a, b = _state(_train_mlp(1, x, y)), _state(_train_mlp(2, x, y))
    pa, pb, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "al.safetensors"
    torch.save(a, pa)
    torch.save(b, pb)
    code, stdout, err = run(["align", pa, pb, "--out", out, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["objective_after"] > doc["objective_before"]
    assert doc["l2_distance_after"] < doc["l2_distance_before"]
    template = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))

    def evaluate(sd):
        template.load_state_dict(sd)
        with torch.no_grad():
            return float(F.cross_entropy(template(x), y))

    naive = interpolate(a, b, evaluate, 9).barrier("score", False)
    aligned = interpolate(a, load_file(out), evaluate, 9).barrier("score", False)
    assert evaluate(a) < 0.5 and evaluate(b) < 0.5  # both learnt the task
    assert aligned <= naive


def test_resnet_state_dict_is_refused_and_the_module_path_works(tmp_path, capsys):
    torch.manual_seed(0)
    net = ResNetish()
    a = _state(net)
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a, pa)
    torch.save(_state(ResNetish()), pb)
    code, _, err = run(["align", pa, pb, "--out", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, err, "cannot align without the architecture")
    assert not (tmp_path / "o.safetensors").exists()
    # torchvision-style names: refused by name
    renamed = {k.replace("short", "downsample.0").replace("bn_s", "downsample.1"): v for k, v in a.items()}
    with pytest.raises(UserError, match="residual connections"):
        spec_from_state(renamed)
    # the Python API with the module supports it
    module_spec = spec_from_module(net)
    b = apply_permutation(module_spec, random_permutations(module_spec, seed=1), a)
    res = align(a, b, spec=net)
    assert res.distance_after == 0.0 < res.distance_before


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 4, 1)), "grouped or depthwise"),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1)), "no running statistics"),
        (lambda: nn.ModuleDict({"embed": nn.Embedding(10, 8), "fc": nn.Linear(8, 4)}), "embedding"),
        (lambda: nn.ModuleDict({"q_proj": nn.Linear(8, 8), "fc": nn.Linear(8, 4)}), "attention"),
        (lambda: nn.Sequential(nn.Linear(8, 6), nn.Linear(5, 4)), "do not form one sequential chain"),
        (lambda: nn.Sequential(nn.Linear(8, 4)), "no hidden units"),
        (DeclaredOutOfOrder, "cannot tell which layer norm 'bn1' follows"),
        (lambda: nn.Sequential(nn.BatchNorm1d(6), nn.Linear(8, 6), nn.Linear(6, 2)), "comes before every"),
    ],
)
def test_unsupported_architectures_are_refused(make, match):
    with pytest.raises(UserError, match=match):
        spec_from_state(make().state_dict())


def test_cli_errors_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    a = _state(mlp())
    pa = tmp_path / "a.safetensors"
    save_file(a, pa)
    other = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 20), nn.Tanh(), nn.Linear(20, 4))
    pc = tmp_path / "c.safetensors"
    save_file(_state(other), pc)
    out = tmp_path / "o.safetensors"
    code, _, err = run(["align", tmp_path / "missing.pt", pa, "--out", out], capsys)
    assert_one_line_error(code, err, "no such file")
    code, _, err = run(["align", pa, pc, "--out", out], capsys)
    assert_one_line_error(code, err, "in model A and")
    code, _, err = run(["align", pa, pa, "--out", pa], capsys)
    assert_one_line_error(code, err, "is also an input")
    code, _, err = run(["align", pa, pa, "--out", out, "--average", out], capsys)
    assert_one_line_error(code, err, "same file")
    bad = dict(a)
    bad["0.weight"] = a["0.weight"].clone()
    bad["0.weight"][0, 0] = float("nan")
    pn = tmp_path / "nan.safetensors"
    save_file(bad, pn)
    code, _, err = run(["align", pa, pn, "--out", out], capsys)
    assert_one_line_error(code, err, "NaN")
    grouped = tmp_path / "g.safetensors"
    save_file(_state(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1))), grouped)
    code, _, err = run(["align", grouped, grouped, "--out", out], capsys)
    assert_one_line_error(code, err, "grouped")
    assert not out.exists()


def test_experiment_smoke_both_parts_and_markdown():
    pytest.importorskip("scipy")
    from netanatomy.datasets import fashion_mnist_dir
    from netanatomy.experiments.soups import Config, Member, render_markdown, run

    if not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    threads = torch.get_num_threads()
    try:
        cfg = Config(
            widths=(4, 8, 8), val_size=200, base_samples=256, member_samples=128, test_size=200, curve_size=100, curve_points=3,
            bn_samples=250, scratch_samples=256, split_pretrain=True, greedy_bn=True,
            members=[Member(0.003, 1, False), Member(0.01, 2, True, 0.1, 256)],
        )
        res = run(cfg)
    finally:
        torch.set_num_threads(threads)
    s = res["soups"]
    assert s["greedy soup"]["val_acc"] >= s["best member"]["val_acc"]
    assert {"val_acc_bn_recal", "test_acc_bn_recal"} <= set(s["uniform soup"])
    assert "greedy soup, BN recalibrated while choosing" in s
    assert res["members"][1]["samples"] == 256 and res["members"][0]["samples"] == 128
    earlier = {k: v for k, v in res.items() if not k.startswith("_")}
    md = render_markdown(res, "cmd", None, earlier)
    assert "Earlier data point" in md and "## 2. Interpolation barrier" in md
    soups_only = {k: v for k, v in res.items() if k not in ("curves", "_curves", "alignment", "endpoints")}
    soups_only["config"] = dict(res["config"], barriers=False)
    md = render_markdown(soups_only, "cmd", None)
    assert "## 2." not in md and "## 1. Soups" in md
