"""``netanatomy experiment synthesis --seed / --seeds``: seed plumbing, aggregation over seeds, resuming."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from netanatomy.cli import main
from netanatomy.experiments import soups as ex


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(map(str, args)))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_line_error(code, err, match):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0] and "Traceback" not in err


def _need_data():
    from netanatomy.datasets import fashion_mnist_dir

    if not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")


# --- seed plumbing, no training ------------------------------------------------------------


def test_default_seeds_are_the_historical_ones():
    soups = ex.CONFIGS["soups"]
    assert soups.split_seed == 0 and soups.start_seed == 0
    assert [m.seed for m in soups.members] == list(range(1, 11))
    assert ex.CONFIGS["full"].scratch_seeds == (10, 11)
    assert [m.seed for m in ex.CONFIGS["full"].members] == [1, 2, 3, 4, 5, 6]
    for cfg in ex.CONFIGS.values():
        assert ex.reseed(cfg, 0) == cfg
    # the split of seed 0 is the permutation used before --seed existed
    val, tr = ex.split_indices(100, replace(soups, val_size=10))
    ref = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(val, ref[:10]) and torch.equal(tr, ref[10:])
    assert ex.result_stem("soups", 0) == "synthesis_soups" and ex.result_stem("full", 0) == "synthesis"
    assert ex.result_stem("soups", 3) == "synthesis_soups_seed3"


def test_reseed_moves_every_seed_and_runs_share_none():
    cfg = ex.CONFIGS["full"]
    used = {}
    for s in range(5):
        c = ex.reseed(cfg, s)
        # hyper-parameters stay, only seeds move
        assert [(m.lr, m.augment, m.label_smoothing, m.samples) for m in c.members] == [
            (m.lr, m.augment, m.label_smoothing, m.samples) for m in cfg.members
        ]
        seeds = {("split", c.split_seed), ("start", c.start_seed)} | {("member", m.seed) for m in c.members}
        seeds |= {("scratch", x) for x in c.scratch_seeds}
        for key in seeds:
            assert key not in used, (key, s, used.get(key))
            used[key] = s
    c1 = ex.reseed(cfg, 1)
    assert c1.split_seed != cfg.split_seed and c1.start_seed != cfg.start_seed
    assert all(a.seed != b.seed for a, b in zip(c1.members, cfg.members))
    assert cfg.members[0].seed == 1  # the original config is not mutated
    v0, _ = ex.split_indices(1000, replace(cfg, val_size=50))
    v1, _ = ex.split_indices(1000, replace(c1, val_size=50))
    assert not torch.equal(v0, v1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            ex.reseed(cfg, bad)


def test_run_seed_changes_results_and_is_deterministic():
    _need_data()
    threads = torch.get_num_threads()
    cfg = ex.Config(
        widths=(4, 8, 8), val_size=200, base_samples=256, member_samples=128, test_size=200, bn_samples=250,
        split_pretrain=True, barriers=False, members=[ex.Member(0.003, 1, False), ex.Member(0.01, 2, True, 0.1)],
    )
    try:
        r0, r1, r1b = ex.run(cfg, seed=0), ex.run(cfg, seed=1), ex.run(cfg, seed=1)
    finally:
        torch.set_num_threads(threads)
    assert r0["seed"] == 0 and r1["seed"] == 1
    assert r1["config"]["split_seed"] == 1000 and r1["config"]["start_seed"] == 1000
    assert [m["seed"] for m in r1["members"]] == [1001, 1002]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(r1) == strip(r1b)
    assert r0["base"]["test_loss"] != r1["base"]["test_loss"]
    assert [m["test_loss"] for m in r0["members"]] != [m["test_loss"] for m in r1["members"]]


def test_every_random_choice_of_a_run_follows_the_seed(monkeypatch):
    """The split, the start's init and data order and each member's seed reach the code that uses them."""
    _need_data()
    calls, splits = [], []
    real_split = ex.split_indices

    def fake_train(model, x, y, samples, lr, seed, augment, batch, label_smoothing=0.0):
        calls.append((seed, torch.initial_seed(), len(x)))
        return model.eval()

    def spy_split(n, cfg):
        splits.append(cfg.split_seed)
        return real_split(n, cfg)

    monkeypatch.setattr(ex, "train", fake_train)
    monkeypatch.setattr(ex, "split_indices", spy_split)
    threads = torch.get_num_threads()
    try:
        res = ex.run("soups-quick", seed=3)
    finally:
        torch.set_num_threads(threads)
    assert splits == [3000]
    assert calls[0][:2] == (3000, 3000)  # start: data order and (global RNG) initialisation
    assert [c[0] for c in calls[1:]] == [3001, 3002, 3003]
    assert res["seed"] == 3 and res["config"]["start_seed"] == 3000


# --- aggregation on made-up results -----------------------------------------------------


def _doc(seed, best, greedy, uniform, start=0.80, ingredients=2):
    """best / greedy / uniform: (held-out acc, test acc)."""
    cfg = json.loads(json.dumps(ex.asdict(ex.reseed(ex.CONFIGS["soups-quick"], seed)), default=list))

    def soup(v, t):
        return {"val_acc": v, "val_acc_bn_recal": v, "test_acc": t, "test_acc_bn_recal": t, "test_loss": 1.0, "test_loss_bn_recal": 1.0}

    return {
        "config": cfg, "config_name": "soups-quick", "seed": seed,
        "base": {"val_acc": start, "test_acc": start, "test_loss": 1.0},
        "members": [{"member": f"member {i}", "val_acc": 0.5, "test_acc": 0.5} for i in range(3)],
        "soups": {"best member": soup(*best), "uniform soup": soup(*uniform), "greedy soup": soup(*greedy)},
        "greedy_ingredients": [f"member {i}" for i in range(ingredients)], "best_member": "member 0",
    }


def test_aggregate_numbers_and_verdicts():
    docs = [
        _doc(2, best=(0.80, 0.79), greedy=(0.82, 0.80), uniform=(0.78, 0.78)),
        _doc(0, best=(0.80, 0.80), greedy=(0.81, 0.79), uniform=(0.79, 0.81)),
        _doc(1, best=(0.80, 0.78), greedy=(0.80, 0.81), uniform=(0.79, 0.77), ingredients=1),
    ]
    agg = ex.aggregate_seeds(docs)
    assert agg["seeds"] == [0, 1, 2]
    assert [r["ingredients"] for r in agg["rows"]] == [2, 1, 2]
    t = agg["stats"]["greedy_minus_best_test"]
    diffs = [-0.01, 0.03, 0.01]
    mean = sum(diffs) / 3
    std = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    assert t["mean"] == pytest.approx(mean) and t["std"] == pytest.approx(std) and t["sem"] == pytest.approx(std / 3**0.5)
    assert (t["at_least_zero"], t["above_zero"], t["min"]) == (2, 2, pytest.approx(-0.01))
    v = agg["stats"]["greedy_minus_best_val"]
    assert (v["at_least_zero"], v["above_zero"]) == (3, 2)
    assert "greedy_bn_minus_best_test" not in agg["stats"]  # no BN greedy soup in these results
    md = ex.render_seeds_markdown(agg, "netanatomy experiment synthesis --config soups-quick --seeds 0,1,2 --out R", {0: "a.md", 1: "b.md"})
    assert "Regenerate: `netanatomy experiment synthesis --config soups-quick --seeds 0,1,2 --out R`" in md
    assert "| 1 | 0.8000 | member 0 | 0.8000 | 0.7800 | 0.7700 | 0.8000 | 0.8100 | 1 of 3 | +0.0000 | +0.0300 |" in md
    assert "greedy soup >= best member in 3 of 3 seeds (strictly greater in 2; mean +0.0100): it held in every seed" in md
    assert "On the test set, greedy soup >= best member in 2 of 3 seeds (strictly greater in 2): it did not hold in every seed" in md
    assert "within two standard errors of zero" in md and "[b.md](b.md)" in md
    try:
        from scipy import stats
    except ImportError:
        stats = None
    if stats is not None:  # t = mean / sem with 2 degrees of freedom
        p = 2 * stats.t.sf(mean / (std / 3**0.5), 2)
        assert f"two-sided p {p:.2g} from a t distribution with 2 degrees of freedom" in md
    # every seed better on test by a steady margin: the verdict changes
    steady = [_doc(s, best=(0.8, 0.8), greedy=(0.81, 0.81 + 0.001 * s), uniform=(0.8, 0.8)) for s in range(3)]
    md = ex.render_seeds_markdown(ex.aggregate_seeds(steady), "cmd")
    assert "On the test set, greedy soup >= best member in 3 of 3 seeds (strictly greater in 3): it held in every seed" in md and "standard errors above zero" in md
    with pytest.raises(ValueError):
        ex.aggregate_seeds([docs[0], copy.deepcopy(docs[0])])
    with pytest.raises(ValueError):
        ex.aggregate_seeds([])


# --- the command -------------------------------------------------------------------------


def test_seeds_command_runs_resumes_and_aggregates(tmp_path, capsys, monkeypatch):
    _need_data()
    threads = torch.get_num_threads()
    try:
        code, out, err = run_cli(["experiment", "synthesis", "--config", "soups-quick", "--seeds", "0,1", "--out", tmp_path], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    j0, j1 = tmp_path / "synthesis_soups-quick.json", tmp_path / "synthesis_soups-quick_seed1.json"
    d0, d1 = json.loads(j0.read_text()), json.loads(j1.read_text())
    assert d0["seed"] == 0 and [m["seed"] for m in d0["members"]] == [1, 2, 3]
    assert d1["seed"] == 1 and [m["seed"] for m in d1["members"]] == [1001, 1002, 1003]
    assert d0["base"]["test_loss"] != d1["base"]["test_loss"]
    assert "--seed 1 --out" in (tmp_path / "synthesis_soups-quick_seed1.md").read_text()
    md = (tmp_path / "synthesis_soups-quick_seeds.md").read_text()
    agg = ex.aggregate_seeds([d0, d1])
    row1 = agg["rows"][1]
    assert f"| 1 | {row1['start_test_acc']:.4f} | {row1['best_member']} |" in md
    assert f"--config soups-quick --seeds 0,1 --out {tmp_path}`" in md
    assert json.loads((tmp_path / "synthesis_soups-quick_seeds.json").read_text())["stats"] == json.loads(json.dumps(agg["stats"]))

    # resuming: finished seeds are read, only the new one runs
    calls = []

    def fake_run(config, log=None, seed=0):
        calls.append(seed)
        doc = copy.deepcopy(d1)
        doc["seed"], doc["config"] = seed, ex.asdict(ex.reseed(ex.CONFIGS[config], seed))
        return doc

    monkeypatch.setattr(ex, "run", fake_run)
    before = j1.read_bytes()
    code, out, err = run_cli(["experiment", "synthesis", "--config", "soups-quick", "--seeds", "1,0,2", "--out", tmp_path], capsys)
    assert code == 0, err
    assert calls == [2] and j1.read_bytes() == before
    assert "seed 1:" in out and "not rerun" in out
    md = (tmp_path / "synthesis_soups-quick_seeds.md").read_text()
    assert "--seeds 1,0,2" in md and "| 2 |" in md and "in 3 seeds" not in md

    # a JSON of another configuration is not silently reused or overwritten
    bad = json.loads(j1.read_text())
    bad["config"]["members"][0]["lr"] = 0.5
    j1.write_text(json.dumps(bad))
    calls.clear()
    code, _, err = run_cli(["experiment", "synthesis", "--config", "soups-quick", "--seeds", "0,1,3", "--out", tmp_path], capsys)
    assert one_line_error(code, err, "another configuration or seed") and calls == []
    j1.write_text("{not json")
    code, _, err = run_cli(["experiment", "synthesis", "--config", "soups-quick", "--seeds", "1", "--out", tmp_path], capsys)
    assert one_line_error(code, err, "not a readable results JSON") and calls == []


@pytest.mark.parametrize(
    "args, match",
    [
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--seeds", "1,x"], "comma-separated integers"),
        (["--seeds", "0,-2"], "comma-separated integers"),
        (["--seeds", "1,1"], "appears twice"),
        (["--seeds", ","], "comma-separated integers"),
        (["--seed", "1", "--seeds", "0,1"], "not both"),
    ],
)
def test_seed_option_errors(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.setattr(ex, "run", lambda *a, **k: pytest.fail("must not run"))
    code, _, err = run_cli(["experiment", "synthesis", "--config", "soups-quick", "--out", tmp_path, *args], capsys)
    assert one_line_error(code, err, match), err
    assert list(tmp_path.iterdir()) == []
