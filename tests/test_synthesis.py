"""Synthesis: streaming averages, EMA, hashed outputs, soups, interpolation."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from netanatomy.errors import UserError
from netanatomy.io import content_hash, stored_hash
from netanatomy.synthesis import (
    average,
    ema,
    ema_weights,
    greedy_soup,
    interpolate,
    uniform_soup,
)
from netanatomy.synthesis.evaluate import CommandEvaluator


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def snapshots(n, seed=0):
    torch.manual_seed(seed)
    net = SmallNet()
    out = []
    for i in range(n):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            net.bn.running_mean.add_(torch.randn(4))
            net.bn.num_batches_tracked.add_(i + 1)
        out.append({k: v.clone() for k, v in net.state_dict().items()})
    return net, out


def write_all(tmp_path, states, prefix="m", fmt="safetensors"):
    paths = []
    for i, s in enumerate(states):
        p = tmp_path / f"{prefix}{i:02d}.{ 'safetensors' if fmt == 'safetensors' else 'pt'}"
        if fmt == "safetensors":
            save_file(s, p)
        else:
            torch.save(s, p)
        paths.append(p)
    return paths


def test_mean_matches_float64_reference_many_checkpoints(tmp_path):
    _, states = snapshots(25)
    paths = write_all(tmp_path, states)
    res = average(paths, tmp_path / "avg.safetensors")
    got = load_file(tmp_path / "avg.safetensors")
    for k, v in states[0].items():
        if v.is_floating_point():
            ref = torch.stack([s[k].double() for s in states]).mean(0).float()
            assert got[k].dtype == torch.float32
            assert torch.equal(got[k], ref), k
    # non-float buffers are taken from the last checkpoint by default
    assert int(got["bn.num_batches_tracked"]) == int(states[-1]["bn.num_batches_tracked"])
    assert res.counts["fc.weight"] == 25


def test_same_numbers_as_averaged_model(tmp_path):
    net, states = snapshots(6, seed=3)
    swa = torch.optim.swa_utils.AveragedModel(copy.deepcopy(net))
    for s in states:
        net.load_state_dict(s)
        swa.update_parameters(net)
    res = average(states)
    for name, p in swa.module.named_parameters():
        torch.testing.assert_close(res.tensors[name], p.detach(), rtol=0, atol=1e-6)
    # AveragedModel keeps buffers from the newest model: so does non_float="last"
    assert torch.equal(res.tensors["bn.num_batches_tracked"], swa.module.bn.num_batches_tracked)


def test_ema_matches_torch_ema(tmp_path):
    net, states = snapshots(7, seed=4)
    decay = 0.8
    avg = torch.optim.swa_utils.AveragedModel(
        copy.deepcopy(net), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
    )
    for s in states:
        net.load_state_dict(s)
        avg.update_parameters(net)
    res = ema(write_all(tmp_path, states), decay, tmp_path / "ema.safetensors")
    got = load_file(tmp_path / "ema.safetensors")
    for name, p in avg.module.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=0, atol=1e-6)
    w = ema_weights(7, decay)
    assert abs(sum(w) - 1) < 1e-12 and w[-1] == pytest.approx(1 - decay)
    assert res.method == "ema"


def test_weighted_mean_and_torch_inputs_give_identical_file(tmp_path):
    _, states = snapshots(4, seed=5)
    st = write_all(tmp_path, states, "s")
    pt = write_all(tmp_path, states, "p", fmt="pt")
    weights = [1, 2, 3, 4]
    r1 = average(st, tmp_path / "a.safetensors", weights=weights)
    r2 = average(pt, tmp_path / "b.safetensors", weights=weights)
    assert r1.sha256 == r2.sha256  # same content whatever the input format
    got = load_file(tmp_path / "a.safetensors")
    ref = sum(w * s["fc.weight"].double() for w, s in zip(weights, states)) / 10
    assert torch.equal(got["fc.weight"], ref.float())


def test_mixed_dtypes_accumulate_in_float64(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(64, 64)
    states = [
        {"w": (base + 0.01 * i).to(torch.bfloat16 if i % 2 else torch.float32), "h": torch.full((8,), 60000.0, dtype=torch.float16)}
        for i in range(10)
    ]
    res = average(states)
    ref = torch.stack([s["w"].double() for s in states]).mean(0)
    assert res.tensors["w"].dtype == torch.float32  # dtype of the first holder
    torch.testing.assert_close(res.tensors["w"].double(), ref, rtol=0, atol=1e-6)
    # fp16 values near the top of its range: a float16 running sum would overflow
    assert torch.isfinite(res.tensors["h"]).all() and res.tensors["h"].dtype == torch.float16
    assert float(res.tensors["h"][0]) == 60000.0
    forced = average(states, dtype="bfloat16")
    assert forced.tensors["w"].dtype == torch.bfloat16


def test_clamp_before_casting_down():
    states = [{"w": torch.tensor([1.0e39, -1.0e39], dtype=torch.float64)}, {"w": torch.tensor([3.0e39, -3.0e39], dtype=torch.float64)}]
    res = average(states, dtype="float32")
    assert torch.isfinite(res.tensors["w"]).all()
    assert float(res.tensors["w"][0]) == torch.finfo(torch.float32).max


def test_hash_in_metadata_and_sidecar(tmp_path):
    _, states = snapshots(3)
    out = tmp_path / "avg.safetensors"
    res = average(write_all(tmp_path, states), out)
    assert stored_hash(out) == res.sha256 == content_hash(out)
    sidecar = (tmp_path / "avg.safetensors.sha256").read_text().split()
    assert sidecar[0] == hashlib.sha256(out.read_bytes()).hexdigest() == res.written.file_sha256
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_mismatches_are_user_errors(tmp_path):
    a = {"w": torch.zeros(3, 3), "n": torch.tensor(1)}
    with pytest.raises(UserError, match="shape mismatch for 'w'"):
        average([a, {"w": torch.zeros(3, 4), "n": torch.tensor(1)}])
    with pytest.raises(UserError, match="missing"):
        average([a, {"w": torch.zeros(3, 3)}])
    with pytest.raises(UserError, match="dtype mismatch"):
        average([a, {"w": torch.zeros(3, 3), "n": torch.tensor(1.0)}])
    with pytest.raises(UserError, match="differs"):
        average([a, {"w": torch.zeros(3, 3), "n": torch.tensor(2)}], non_float="equal")
    with pytest.raises(UserError, match="weights"):
        average([a, a], weights=[1.0])
    with pytest.raises(UserError, match="no such file"):
        average([tmp_path / "nope.safetensors"])


def test_allow_missing_uses_per_key_counts():
    a = {"w": torch.ones(2), "extra": torch.full((2,), 4.0)}
    b = {"w": torch.full((2,), 3.0)}
    res = average([a, b], allow_missing=True)
    assert torch.equal(res.tensors["w"], torch.full((2,), 2.0))
    assert torch.equal(res.tensors["extra"], torch.full((2,), 4.0))
    assert res.counts == {"extra": 1, "w": 2} and res.notes


def test_prefixes_are_stripped():
    a = {"module.fc.weight": torch.ones(2)}
    b = {"_orig_mod.fc.weight": torch.full((2,), 3.0)}
    assert torch.equal(average([a, b]).tensors["fc.weight"], torch.full((2,), 2.0))


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "avg.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(UserError):
        average([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], out)
    assert out.read_bytes() == b"old"


# --- soups -----------------------------------------------------------------


def _quadratic_members(n=6, seed=0):
    """Members around an optimum at 0 with different noise; score = -||w||^2 on a
    'held-out' objective, so averaging helps some members and hurts with outliers."""
    g = torch.Generator().manual_seed(seed)
    members = []
    for i in range(n):
        scale = 0.2 if i < n - 2 else 3.0  # two bad members
        members.append({"w": torch.randn(50, generator=g) * scale + 0.05, "b": torch.randn(5, generator=g) * scale})
    return members


def heldout(state):
    return -float(sum(v.double().pow(2).sum() for v in state.values()))


def test_greedy_soup_never_worse_than_best_member():
    for seed in range(5):
        members = _quadratic_members(seed=seed)
        res = greedy_soup(members, heldout)
        best = max(heldout(m) for m in members)
        assert res.score >= best
        assert res.score == pytest.approx(heldout(res.tensors))
        assert len(res.ingredients) < len(members)  # the outliers are left out
        steps = [s["soup_score"] for s in res.steps if s["accepted"]]
        assert steps == sorted(steps)


def test_greedy_soup_lower_is_better_and_uniform_soup():
    members = _quadratic_members(seed=1)
    loss = lambda s: -heldout(s)  # noqa: E731
    res = greedy_soup(members, loss, higher_is_better=False)
    assert res.score <= min(loss(m) for m in members)
    uni = uniform_soup(members, evaluate=heldout, score_members=True)
    assert uni.ingredients == uni.members and uni.score == pytest.approx(heldout(uni.tensors))


# reads float32 safetensors without importing torch (fast to start)
PURE_PYTHON_EVAL = """
import array, json, struct, sys
with open(sys.argv[1], "rb") as fh:
    n = struct.unpack("<Q", fh.read(8))[0]
    header = json.loads(fh.read(n))
    data = fh.read()
total = 0.0
for k, v in header.items():
    if k == "__metadata__":
        continue
    a, b = v["data_offsets"]
    vals = array.array("f")
    vals.frombytes(data[a:b])
    total += sum(x * x for x in vals)
print("log line")
print(-total)
"""


def test_command_evaluator_and_its_failures(tmp_path):
    script = tmp_path / "ev.py"
    script.write_text(PURE_PYTHON_EVAL)
    import sys

    members = _quadratic_members(4, seed=2)
    paths = write_all(tmp_path, members)
    res = greedy_soup(paths, [sys.executable, str(script), "{model}"], tmp_path / "soup.safetensors")
    ref = greedy_soup(members, heldout)
    assert load_file(tmp_path / "soup.safetensors").keys() == members[0].keys()
    assert [int(name[1:3]) for name in res.ingredients] == [int(x.split()[1]) for x in ref.ingredients]
    assert res.score == pytest.approx(ref.score, rel=1e-6)
    bad = CommandEvaluator([sys.executable, "-c", "import sys; print('oops', file=sys.stderr); sys.exit(4)"])
    with pytest.raises(UserError, match="exit code 4.*oops"):
        bad({"w": torch.zeros(1)})
    with pytest.raises(UserError, match="no number"):
        CommandEvaluator([sys.executable, "-c", "print('done')"])({"w": torch.zeros(1)})
    with pytest.raises(UserError, match="timed out"):
        CommandEvaluator([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.5)({"w": torch.zeros(1)})
    with pytest.raises(UserError, match="not found"):
        CommandEvaluator(["/nonexistent/evaluator"])({"w": torch.zeros(1)})


# --- interpolation -----------------------------------------------------------


def test_interpolation_curve_and_barrier():
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([0.0, 1.0])}

    def ev(s):  # a loss with minima at a and b and a bump in between
        w = s["w"].double()
        return {"loss": float(-(w - torch.tensor([1.0, 0.0])).norm() * (w - torch.tensor([0.0, 1.0])).norm() * -1), "acc": 1.0}

    curve = interpolate(a, b, ev, 5)
    assert curve.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.values["loss"][0] == pytest.approx(0.0) and curve.values["loss"][-1] == pytest.approx(0.0)
    assert curve.barrier("loss") == pytest.approx(0.5)  # 0.5*sqrt2 * 0.5*sqrt2 at the midpoint
    assert curve.barrier("acc") == pytest.approx(0.0)
    mid = interpolate(a, b, lambda s: float(s["w"][0]), [0.5]).values["score"][0]
    assert mid == pytest.approx(0.5)


def test_sharded_folders_average(tmp_path):
    import json

    _, states = snapshots(2, seed=9)
    folders = []
    for i, s in enumerate(states):
        d = tmp_path / f"run{i}"
        d.mkdir()
        keys = sorted(s)
        half = {k: s[k] for k in keys[: len(keys) // 2]}, {k: s[k] for k in keys[len(keys) // 2 :]}
        wm = {}
        for j, part in enumerate(half):
            name = f"model-0000{j + 1}-of-00002.safetensors"
            save_file(part, d / name)
            wm.update({k: name for k in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        folders.append(d)
    res = average(folders)
    ref = (states[0]["fc.weight"].double() + states[1]["fc.weight"].double()) / 2
    assert torch.equal(res.tensors["fc.weight"], ref.float())
    assert set(res.tensors) == set(states[0])
