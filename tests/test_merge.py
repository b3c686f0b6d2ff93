"""Merges through task vectors (task arithmetic, TIES, DARE) and slerp: hand-worked
numbers on tiny tensors, the streamed file and its recipe, the layer filter,
alignment, and one-line CLI errors."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from netanatomy.errors import UserError
from netanatomy.io import content_hash, open_store, read_tensors, stored_hash
from netanatomy.synthesis import apply_permutation, random_permutations
from netanatomy.synthesis.chain import spec_from_state
from netanatomy.synthesis.merge import (
    RECIPE_KEY,
    dare_linear,
    dare_ties,
    merge,
    model_stock,
    slerp,
    task_arithmetic,
    tensor_seed,
    ties,
    trim,
)

from test_synthesis_cli import assert_one_line_error, run

T = torch.tensor


# ---------------------------------------------------------------------------
# task arithmetic


def test_task_arithmetic_by_hand():
    base = {"a": T([1.0, 2.0]), "b": T([[0.0, 1.0], [1.0, 0.0]]), "c": T([10.0])}
    m1 = {"a": T([2.0, 2.0]), "b": T([[1.0, 1.0], [1.0, 2.0]]), "c": T([11.0])}
    m2 = {"a": T([1.0, 0.0]), "b": T([[0.0, 3.0], [1.0, 0.0]]), "c": T([7.0])}
    # task vectors: m1 - base = a [1, 0], b [[1, 0], [0, 2]], c [1]; m2 - base = a [0, -2], b [[0, 2], [0, 0]], c [-3]
    got = task_arithmetic(base, [m1, m2]).tensors
    assert torch.equal(got["a"], T([2.0, 0.0]))
    assert torch.equal(got["b"], T([[1.0, 3.0], [1.0, 2.0]]))
    assert torch.equal(got["c"], T([8.0]))
    # lambda 0.5, weights 2 and 1: base + 0.5 * (2 tau1 + tau2)
    got = task_arithmetic(base, [m1, m2], lam=0.5, weights=[2, 1]).tensors
    assert torch.equal(got["a"], T([2.0, 1.0]))  # [1, 2] + 0.5 * [2, -2]
    assert torch.equal(got["b"], T([[1.0, 2.0], [1.0, 2.0]]))  # + 0.5 * [[2, 2], [0, 4]]
    assert torch.equal(got["c"], T([9.5]))  # 10 + 0.5 * (2 - 3)
    # a negative lambda subtracts the task vector (task negation)
    assert torch.equal(task_arithmetic(base, [m1], lam=-1.0).tensors["a"], T([0.0, 2.0]))


def test_task_arithmetic_keeps_the_base_dtype_and_copies_non_float_from_base():
    base = {"w": T([1.0, 2.0], dtype=torch.float16), "steps": T(5)}
    m = {"w": T([1.5, 2.5]), "steps": T(9)}
    res = task_arithmetic(base, [m], lam=2.0)
    assert res.tensors["w"].dtype == torch.float16 and torch.equal(res.tensors["w"], T([2.0, 3.0], dtype=torch.float16))
    assert int(res.tensors["steps"]) == 5
    assert any("non-float" in n and "steps" in n for n in res.notes)


# ---------------------------------------------------------------------------
# TIES


def test_trim_keeps_the_top_fraction_by_magnitude():
    assert torch.equal(trim(T([3.0, -1.0, 0.5, -2.0]), 0.5), T([3.0, 0.0, 0.0, -2.0]))
    assert torch.equal(trim(T([3.0, -1.0, 0.5, -2.0]), 0.25), T([3.0, 0.0, 0.0, 0.0]))
    assert torch.equal(trim(T([3.0, -1.0, 0.5, -2.0]), 1.0), T([3.0, -1.0, 0.5, -2.0]))
    # 0.07 of 100 entries is 7, not 8 (in floating point 0.07 * 100 = 7.000000000000001)
    assert int((trim(torch.arange(1.0, 101.0), 0.07) != 0).sum()) == 7
    # a 2-D tensor is ranked over all its entries
    assert torch.equal(trim(T([[0.1, -5.0], [4.0, 0.2]]), 0.5), T([[0.0, -5.0], [4.0, 0.0]]))


def test_ties_trim_elect_and_disjoint_mean_by_hand():
    base = {"w": T([1.0, 1.0, 1.0, 1.0])}
    # task vectors          [ 3, -1, 0.5,  2]  and  [-1,  2, 0.2, -4]
    m1 = {"w": T([4.0, 0.0, 1.5, 3.0])}
    m2 = {"w": T([0.0, 3.0, 1.2, -3.0])}
    # density 0.5 keeps      [ 3,  0,  0,   2]  and  [ 0,  2,  0,  -4]
    # elected sign of the sum [3, 2, 0, -2]:  +, +, 0, -
    # disjoint mean:          3 (m1 alone), 2 (m2 alone), 0 (no one), -4 (m2 agrees, m1 does not)
    got = ties(base, [m1, m2], density=0.5).tensors["w"]
    assert torch.equal(got, T([4.0, 3.0, 1.0, -3.0]))
    # lambda scales the merged vector
    assert torch.equal(ties(base, [m1, m2], density=0.5, lam=0.5).tensors["w"], T([2.5, 2.0, 1.0, -1.0]))


def test_ties_disjoint_mean_over_agreeing_members_only():
    base = {"w": torch.zeros(3)}
    members = [{"w": T([1.0, -2.0, 1.0])}, {"w": T([3.0, 1.0, -1.0])}, {"w": T([-1.0, -1.0, 0.0])}]
    # density 1: no trimming. sums [3, -2, 0] -> signs +, -, 0
    # entry 0: members 0 and 1 agree: (1 + 3) / 2 = 2; entry 1: members 0 and 2: (-2 - 1) / 2 = -1.5; entry 2: sign 0 -> 0
    assert torch.equal(ties(base, members, density=1.0).tensors["w"], T([2.0, -1.5, 0.0]))
    # with weights 1, 1, 4 the elected sign of entry 0 is 1 + 3 - 4 = 0 and of entry 1 -2 + 1 - 4 < 0;
    # entry 1's weighted disjoint mean is (1 * -2 + 4 * -1) / (1 + 4) = -1.2; entry 2: 1 - 1 = 0 -> 0
    assert torch.allclose(ties(base, members, density=1.0, weights=[1, 1, 4]).tensors["w"], T([0.0, -1.2, 0.0]))
    # per-member densities: member 1 keeps only its largest entry (3); the others keep all
    got = ties(base, members, density=[1.0, 1 / 3, 1.0]).tensors["w"]
    # trimmed: [1, -2, 1], [3, 0, 0], [-1, -1, 0]; sums [3, -3, 1]; entry 2: only member 0 -> 1
    assert torch.equal(got, T([2.0, -1.5, 1.0]))


# ---------------------------------------------------------------------------
# DARE


def _pair(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(n, generator=g, dtype=torch.float64)}
    members = [{"w": base["w"] + torch.randn(n, generator=g, dtype=torch.float64)} for _ in range(2)]
    return base, members


def test_dare_drop_zero_equals_task_arithmetic():
    base, members = _pair()
    ta = task_arithmetic(base, members, lam=0.7, weights=[1.0, 0.5]).tensors["w"]
    assert torch.equal(dare_linear(base, members, 0.0, seed=3, lam=0.7, weights=[1.0, 0.5]).tensors["w"], ta)
    # and DARE-TIES with nothing dropped is TIES without trimming
    assert torch.equal(dare_ties(base, members, 0.0, seed=3).tensors["w"], ties(base, members, density=1.0).tensors["w"])


def test_dare_mean_over_seeds_is_the_task_vector():
    base, members = _pair(n=300)
    p, seeds = 0.5, 200
    tau = members[0]["w"] - base["w"]
    acc = torch.zeros_like(tau)
    for s in range(seeds):
        acc += dare_linear(base, members[:1], p, seed=s).tensors["w"] - base["w"]
    mean = acc / seeds
    # each seed's entry is 0 or tau / (1 - p); its standard deviation is |tau| sqrt(p / (1 - p))
    se = tau.abs() * math.sqrt(p / (1 - p)) / math.sqrt(seeds)
    assert bool(((mean - tau).abs() <= 5 * se + 1e-12).all())
    # and about a fraction p of entries is dropped, rescaled survivors are tau / (1 - p)
    one = dare_linear(base, members[:1], p, seed=0).tensors["w"] - base["w"]
    kept = one != 0
    assert 0.4 < float(kept.double().mean()) < 0.6
    assert torch.allclose(one[kept], tau[kept] / (1 - p))
    plain = dare_linear(base, members[:1], p, seed=0, rescale=False).tensors["w"] - base["w"]
    assert torch.equal(plain != 0, kept) and torch.allclose(plain[kept], tau[kept])


def test_dare_is_deterministic_per_seed_and_order_free():
    base, members = _pair()
    a = dare_ties(base, members, 0.3, seed=7).tensors["w"]
    b = dare_ties(base, members, 0.3, seed=7).tensors["w"]
    c = dare_ties(base, members, 0.3, seed=8).tensors["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(dare_linear(base, members, 0.3, seed=1).tensors["w"], dare_linear(base, members, 0.3, seed=2).tensors["w"])
    # a tensor's masks depend on the seed and its name, not on which other tensors are merged
    more = ({"v": torch.ones(5, dtype=torch.float64), **base}, [{"v": torch.full((5,), 2.0, dtype=torch.float64), **m} for m in members])
    assert torch.equal(dare_ties(*more, 0.3, seed=7).tensors["w"], a)
    assert tensor_seed(7, "w", 0) != tensor_seed(7, "w", 1) != tensor_seed(7, "v", 1)


# ---------------------------------------------------------------------------
# Model Stock


def test_model_stock_by_hand():
    base = {"w": T([1.0, 1.0])}
    # task vectors [1, 0] and [1, 1]: cos = 1/sqrt(2); t = 2 cos / (1 + cos); mean task vector [1, 0.5]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    got = model_stock(base, [{"w": T([2.0, 1.0])}, {"w": T([2.0, 2.0])}]).tensors["w"]
    assert torch.allclose(got, T([1.0 + t, 1.0 + 0.5 * t]))
    # parallel task vectors: cos 1, t 1: the members' mean
    assert torch.allclose(model_stock(base, [{"w": T([2.0, 1.0])}, {"w": T([3.0, 1.0])}]).tensors["w"], T([2.5, 1.0]))
    # three orthogonal task vectors: cos 0, t 0: the base
    base3 = {"w": torch.zeros(3)}
    res = model_stock(base3, [{"w": T([1.0, 0.0, 0.0])}, {"w": T([0.0, 2.0, 0.0])}, {"w": T([0.0, 0.0, 3.0])}])
    assert torch.allclose(res.tensors["w"], torch.zeros(3)) and any("ratio t" in n for n in res.notes)
    # three task vectors at 120 degrees: mean cosine -1/2 = -1/(k-1), the ratio's denominator vanishes: t = 0
    r = [T([1.0, 0.0]), T([-0.5, math.sqrt(3) / 2]), T([-0.5, -math.sqrt(3) / 2])]
    assert torch.allclose(model_stock({"w": torch.zeros(2)}, [{"w": v} for v in r]).tensors["w"], torch.zeros(2), atol=1e-7)
    with pytest.raises(UserError, match="at least two members"):
        model_stock(base, [{"w": T([2.0, 1.0])}])


def test_model_stock_mean_cosine_from_the_unit_sum_matches_pairwise():
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(50, generator=g, dtype=torch.float64)}
    ms = [{"w": base["w"] + torch.randn(50, generator=g, dtype=torch.float64) + 0.5} for _ in range(4)]
    taus = [m["w"] - base["w"] for m in ms]
    cos = [float(a @ b / (a.norm() * b.norm())) for i, a in enumerate(taus) for b in taus[i + 1:]]
    c = sum(cos) / len(cos)
    t = 4 * c / (1 + 3 * c)
    want = base["w"] + t * torch.stack(taus).mean(0)
    assert torch.allclose(model_stock(base, ms).tensors["w"], want, atol=1e-12)


# ---------------------------------------------------------------------------
# SLERP


def test_slerp_on_orthogonal_unit_vectors():
    a, b = {"w": T([1.0, 0.0])}, {"w": T([0.0, 1.0])}
    assert torch.equal(slerp(a, b, 0.0).tensors["w"], a["w"])
    assert torch.equal(slerp(a, b, 1.0).tensors["w"], b["w"])
    mid = slerp(a, b, 0.5).tensors["w"]
    assert torch.allclose(mid, (a["w"] + b["w"]) / math.sqrt(2), atol=1e-7)
    assert abs(float(mid.norm()) - 1.0) < 1e-6  # the midpoint stays on the sphere; lerp's has norm 0.707
    third = slerp(a, b, 1 / 3).tensors["w"]  # a third of the right angle: 30 degrees
    assert torch.allclose(third, T([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-7)


def test_slerp_falls_back_to_lerp_when_parallel_or_zero():
    a = {"w": T([1.0, 2.0, 2.0]), "z": torch.zeros(2)}
    b = {"w": T([2.0, 4.0, 4.0]), "z": T([1.0, 1.0])}
    res = slerp(a, b, 0.25)
    assert torch.allclose(res.tensors["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert torch.allclose(res.tensors["z"], T([0.25, 0.25]))
    assert any("linear interpolation" in n for n in res.notes)
    with pytest.raises(UserError, match="t must lie in"):
        slerp(a, b, 1.5)


# ---------------------------------------------------------------------------
# files, recipe, filter, alignment


def _write(tmp_path, name, state):
    p = tmp_path / name
    save_file(state, p)
    return p


def test_streamed_output_round_trips_and_records_the_recipe(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"l1.weight": torch.randn(6, 4, generator=g), "l1.bias": torch.randn(6, generator=g), "n": T(3)}
    ms = [{k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()} for _ in range(3)]
    paths = [_write(tmp_path, "base.safetensors", base)] + [_write(tmp_path, f"m{i}.safetensors", m) for i, m in enumerate(ms)]
    out = tmp_path / "out.safetensors"
    res = ties(paths[0], paths[1:], density=0.5, lam=0.8, out=out)
    assert res.tensors is None and res.written.path == out
    mem = ties(base, ms, density=0.5, lam=0.8).tensors
    got, meta = read_tensors(out)
    assert set(got) == set(mem) and all(torch.equal(got[k], mem[k]) for k in mem)
    assert stored_hash(out) == content_hash(out) == res.sha256
    assert hashlib.sha256(out.read_bytes()).hexdigest() == res.written.file_sha256
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["method"] == "ties" and recipe["params"]["density"] == [0.5] * 3 and recipe["params"]["lambda"] == 0.8
    assert [i["sha256"] for i in recipe["inputs"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    record = json.loads(res.recipe_path.read_text())
    assert res.recipe_path.name == "out.safetensors.recipe.json"
    assert record["method"] == "ties" and record["output"]["sha256"] == res.written.file_sha256
    # a seeded method records its seed
    dres = dare_linear(paths[0], paths[1:], 0.2, seed=11, out=tmp_path / "d.safetensors")
    drec = json.loads(open_store(tmp_path / "d.safetensors").metadata[RECIPE_KEY])
    assert drec["seed"] == 11 and drec["params"]["drop"] == 0.2 and dres.recipe["method"] == "dare_linear"


def test_include_exclude_leave_unselected_tensors_equal_to_base():
    base = {"enc.0.weight": T([1.0, 1.0]), "enc.1.weight": T([2.0, 2.0]), "head.weight": T([3.0, 3.0])}
    m = {k: v + 1.0 for k, v in base.items()}
    res = task_arithmetic(base, [m], include=["enc.*"], exclude="enc.1.*")
    assert torch.equal(res.tensors["enc.0.weight"], T([2.0, 2.0]))
    assert torch.equal(res.tensors["enc.1.weight"], base["enc.1.weight"])
    assert torch.equal(res.tensors["head.weight"], base["head.weight"])
    assert res.merged_keys == ["enc.0.weight"] and any("2 tensor(s) outside" in n for n in res.notes)
    with pytest.raises(UserError, match="no float tensor is selected"):
        task_arithmetic(base, [m], include="dec.*")


def test_align_permutes_members_to_the_base_first():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    spec = spec_from_state(base)
    # the member is the base plus a small change, its hidden units then shuffled: same function, far in weight space
    tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    member = {k: v.contiguous() for k, v in apply_permutation(spec, random_permutations(spec, seed=5), tuned).items()}
    naive = task_arithmetic(base, [member]).tensors
    aligned = task_arithmetic(base, [member], align=True)
    assert any("units moved" in n for n in aligned.notes)
    assert all(torch.allclose(aligned.tensors[k], tuned[k], atol=1e-6) for k in base)
    assert not all(torch.allclose(naive[k], tuned[k], atol=1e-6) for k in base)


def test_merge_dispatch_and_member_checks():
    base, m = {"w": T([1.0])}, {"w": T([2.0])}
    assert torch.equal(merge("task-arithmetic", base, [m]).tensors["w"], T([2.0]))
    assert torch.equal(merge("slerp", base, [m], t=0.0).tensors["w"], T([1.0]))
    with pytest.raises(UserError, match="slerp interpolates two models"):
        merge("slerp", base, [m, m], t=0.5)
    with pytest.raises(UserError, match="unknown merge method"):
        merge("average", base, [m])
    with pytest.raises(UserError, match="at least one member"):
        task_arithmetic(base, [])
    with pytest.raises(UserError, match="2 weights for 1 members"):
        task_arithmetic(base, [m], weights=[1, 2])


# ---------------------------------------------------------------------------
# CLI


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(5, 4, generator=g), "a.bias": torch.randn(5, generator=g), "steps": T(3)}
    paths = {"base": _write(tmp_path, "base.safetensors", base)}
    for i in range(2):
        paths[f"m{i}"] = _write(tmp_path, f"m{i}.safetensors", {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()})
    paths["keys"] = _write(tmp_path, "keys.safetensors", {"a.weight": base["a.weight"], "b.bias": base["a.bias"], "steps": T(3)})
    paths["shapes"] = _write(tmp_path, "shapes.safetensors", {"a.weight": torch.zeros(4, 5), "a.bias": base["a.bias"], "steps": T(3)})
    return paths


def test_cli_ties_matches_the_api(tmp_path, files, capsys):
    out = tmp_path / "ties.safetensors"
    code, stdout, _ = run(["merge", "ties", "--base", files["base"], files["m0"], files["m1"], "--density", "0.5", "--lambda", "0.9", "--out", out], capsys)
    assert code == 0, stdout
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in stdout and "recipe" in stdout and "steps" in stdout
    ref = ties(files["base"], [files["m0"], files["m1"]], density=0.5, lam=0.9).tensors
    got = load_file(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    out2 = tmp_path / "slerp.safetensors"
    code, stdout, _ = run(["merge", "slerp", files["m0"], files["m1"], "--t", "0.5", "--out", out2, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["params"]["t"] == 0.5
    ref = slerp(files["m0"], files["m1"], 0.5).tensors
    assert torch.equal(load_file(out2)["a.weight"], ref["a.weight"])
    code, stdout, _ = run(["merge", "dare_linear", "--base", files["base"], files["m0"], "--drop", "0.3", "--seed", "4",
                           "--exclude", "*.bias", "--out", tmp_path / "d.safetensors", "--json"], capsys)
    doc = json.loads(stdout)
    assert code == 0 and doc["seed"] == 4 and doc["merged_tensors"] == 1
    assert torch.equal(load_file(tmp_path / "d.safetensors")["a.bias"], load_file(files["base"])["a.bias"])
    code, stdout, _ = run(["merge", "model_stock", "--base", files["base"], files["m0"], files["m1"], "--out", tmp_path / "s.safetensors"], capsys)
    ref = model_stock(files["base"], [files["m0"], files["m1"]]).tensors
    assert code == 0 and "ratio t" in stdout and torch.equal(load_file(tmp_path / "s.safetensors")["a.weight"], ref["a.weight"])


@pytest.mark.parametrize(
    "case, match",
    [
        ("keys", "missing from"),
        ("shapes", "shape mismatch for 'a.weight'"),
        ("density_zero", "density must lie in (0, 1]"),
        ("density_big", "density must lie in (0, 1]"),
        ("drop_one", "drop rate must lie in [0, 1)"),
        ("drop_negative", "drop rate must lie in [0, 1)"),
        ("lambda_nan", "lambda must be a finite number"),
        ("t_nan", "t must be a finite number"),
        ("no_base", "needs --base"),
        ("missing_file", "no such file"),
        ("missing_base_file", "no such file"),
        ("option_of_another_method", "--density does not apply to task_arithmetic"),
        ("slerp_three", "slerp takes two models"),
        ("unknown_method", "unknown merge method"),
        ("weights_count", "1 weights for 2 members"),
        ("out_is_input", "is also an input"),
        ("align_unsupported", "cannot align"),
        ("stock_lambda", "--lambda does not apply to model_stock"),
    ],
)
def test_cli_bad_inputs_exit_2_and_write_nothing(tmp_path, files, capsys, case, match):
    out = tmp_path / "o.safetensors"
    b, m0, m1 = files["base"], files["m0"], files["m1"]
    args = {
        "keys": ["task_arithmetic", "--base", b, m0, files["keys"]],
        "shapes": ["task_arithmetic", "--base", b, files["shapes"]],
        "density_zero": ["ties", "--base", b, m0, "--density", "0"],
        "density_big": ["ties", "--base", b, m0, "--density", "1.5"],
        "drop_one": ["dare_ties", "--base", b, m0, "--drop", "1"],
        "drop_negative": ["dare_linear", "--base", b, m0, "--drop", "-0.1"],
        "lambda_nan": ["task_arithmetic", "--base", b, m0, "--lambda", "nan"],
        "t_nan": ["slerp", m0, m1, "--t", "nan"],
        "no_base": ["ties", m0, m1, "--density", "0.5"],
        "missing_file": ["task_arithmetic", "--base", b, tmp_path / "nope.safetensors"],
        "missing_base_file": ["task_arithmetic", "--base", tmp_path / "nope.safetensors", m0],
        "option_of_another_method": ["task_arithmetic", "--base", b, m0, "--density", "0.5"],
        "slerp_three": ["slerp", b, m0, m1, "--t", "0.5"],
        "unknown_method": ["average", "--base", b, m0],
        "weights_count": ["task_arithmetic", "--base", b, m0, m1, "--weights", "1"],
        "out_is_input": ["task_arithmetic", "--base", b, m0, "--out", m0],
        "align_unsupported": ["task_arithmetic", "--base", b, m0, "--align"],  # one linear layer: no hidden units
        "stock_lambda": ["model_stock", "--base", b, m0, m1, "--lambda", "0.5"],
    }[case]
    if "--out" not in args:
        args = args + ["--out", out]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(["merge", *args], capsys)
    assert_one_line_error(code, err, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_trim_breaks_ties_at_the_cut_by_position():
    assert torch.equal(trim(T([1.0, -2.0, 2.0, 2.0, 0.5]), 0.4), T([0.0, -2.0, 2.0, 0.0, 0.0]))
    assert torch.equal(trim(torch.zeros(4), 0.5), torch.zeros(4))
    # a transposed (non-contiguous) tensor is trimmed like its contiguous copy, and left as it was
    x = T([[0.1, 4.0], [-5.0, 0.2]]).t()
    assert torch.equal(trim(x, 0.5), T([[0.0, -5.0], [4.0, 0.0]])) and torch.equal(x, T([[0.1, -5.0], [4.0, 0.2]]))


def test_pytorch_checkpoints_merge_like_state_dicts_and_say_how_they_are_read(tmp_path):
    base = {"w": T([1.0, -1.0, 2.0]), "b": T([0.5])}
    ms = [{"w": T([2.0, -1.0, 0.0]), "b": T([1.5])}, {"w": T([1.0, 1.0, 3.0]), "b": T([0.0])}]
    paths = []
    for i, s in enumerate([base, *ms]):
        paths.append(tmp_path / f"c{i}.pt")
        torch.save(s, paths[-1])
    res = ties(paths[0], paths[1:], density=0.5, key=None)
    ref = ties(base, ms, density=0.5)
    assert all(torch.equal(res.tensors[k], ref.tensors[k]) for k in base)
    assert any("memory-mapped" in n for n in res.notes)
