"""Permutation alignment (weight matching) and batch-norm recalibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netanatomy.errors import UserError
from netanatomy.synthesis import (
    align,
    apply_permutation,
    random_permutations,
    recalibrate_bn,
    spec_from_module,
    weight_matching,
)
from netanatomy.synthesis.permute import invert


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 24)
        self.drop = nn.Dropout(0.1)
        self.fc3 = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.ln(self.fc1(x)))
        return self.fc3(self.drop(torch.tanh(self.fc2(x))))


class CNN(nn.Module):
    """conv-bn-relu, max-pool, conv, flatten of a spatial map into a linear layer."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 6, 3)
        self.fc1 = nn.Linear(6 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.b1(self.c1(x))))
        x = torch.relu(self.c2(x))
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DownBlock(nn.Module):
    """A block with a projection shortcut: starts a new residual stream."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.bn_s = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.bn_s(self.short(x)))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.layer2 = nn.Sequential(DownBlock(8, 12), Block(12))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_bn(net):
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)


@pytest.mark.parametrize(
    "cls, shape, expected_perms",
    [(MLP, (5, 12), 2), (CNN, (3, 1, 8, 8), 3), (ResNetish, (2, 1, 8, 8), 6)],
)
def test_recovers_a_known_permutation_and_keeps_the_function(cls, shape, expected_perms):
    torch.manual_seed(0)
    net = cls()
    _randomize_bn(net)
    net.eval()
    spec = spec_from_module(net)
    assert len(spec.sizes) == expected_perms
    a = {k: v.clone() for k, v in net.state_dict().items()}
    truth = random_permutations(spec, seed=7)
    b = apply_permutation(spec, truth, a)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(*shape)
    twin = cls().eval()
    twin.load_state_dict(b)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-5, atol=1e-5)  # permuting keeps the function
    res = align(a, b, spec)
    for p, perm in res.perms.items():
        assert torch.equal(perm, invert(truth[p])), p  # recovered exactly
    for k in a:
        assert torch.equal(res.aligned[k], a[k]), k
    assert res.distance_after == 0.0 < res.distance_before
    assert res.objective_after > res.objective_before


def test_resnet_streams_share_one_permutation():
    spec = spec_from_module(ResNetish())
    ka = spec.key_axes()
    stream1 = {p for _, p, _ in ka["stem.weight"]}
    # every block of layer1 writes to the stem's stream: bn2 of both blocks is permuted by it
    assert {p for _, p, _ in ka["layer1.0.bn2.weight"]} == stream1
    assert {p for _, p, _ in ka["layer1.1.bn2.weight"]} == stream1
    # the projection shortcut and the second stage share a new one
    stream2 = {p for _, p, _ in ka["layer2.0.bn_s.weight"]}
    assert stream2 == {p for _, p, _ in ka["layer2.1.bn2.weight"]} != stream1
    # the output layer's rows are never permuted (the logits are fixed)
    assert [ax for ax, _, _ in ka["fc.weight"]] == [1]


def test_flatten_moves_spatial_blocks_with_channels():
    spec = spec_from_module(CNN())
    entries = {(k, ax): inner for p in spec.axes.values() for k, ax, inner in p}
    assert entries[("fc1.weight", 1)] == 4


def test_alignment_of_independent_networks_lowers_distance():
    torch.manual_seed(1)
    a, b = MLP(), MLP()
    res = align(a, b, a)
    assert res.distance_after < res.distance_before
    assert res.objective_after >= res.objective_before
    x = torch.randn(4, 12)
    twin = MLP().eval()
    twin.load_state_dict(res.aligned)
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), b(x), rtol=1e-5, atol=1e-5)


def test_unsupported_parts_stay_fixed():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(4, 6)
            self.h = nn.Linear(6, 6)
            self.out = nn.Linear(12, 2)

        def forward(self, x):
            return self.out(torch.cat([self.a(x), torch.relu(self.h(self.b(x)))], 1))

    spec = spec_from_module(Cat())
    # a and h feed a concat: fixed; only b's output (read by h alone) is permutable
    assert list(spec.sizes) == ["b"]
    assert any("cat" in f for f in spec.fixed) or spec.fixed


def test_spec_mismatch_is_a_user_error():
    spec = spec_from_module(MLP())
    with pytest.raises(UserError, match="fc1.weight"):
        weight_matching(spec, {"fc1.weight": torch.zeros(3, 3)}, MLP().state_dict())


def test_recalibrate_bn_recomputes_statistics():
    torch.manual_seed(0)
    net = CNN()
    data = [torch.randn(16, 1, 8, 8) * 2 + 1 for _ in range(4)]
    net.b1.running_mean.fill_(100.0)
    net.eval()
    used = recalibrate_bn(net, [(x, None) for x in data])
    assert used == 4 and not net.training
    with torch.no_grad():
        feats = torch.cat([net.c1(x) for x in data])
    torch.testing.assert_close(net.b1.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert net.b1.momentum == 0.1
    assert recalibrate_bn(MLP(), data) == 0


def test_experiment_cnn_has_three_permutable_spaces():
    from netanatomy.experiments.soups import SmallCNN

    spec = spec_from_module(SmallCNN((4, 6, 8)))
    assert sorted(spec.sizes.values()) == [4, 6, 8]
    assert spec.fixed == ["fc"]
