"""``netanatomy experiment synthesis --config merge``: smoke run, selection on validation, bad config."""

from __future__ import annotations

import pytest

from netanatomy.cli import main
from netanatomy.datasets import fashion_mnist_available
from netanatomy.experiments import merges as mx

needs_data = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed")


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(map(str, args)))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@needs_data
def test_smoke_config_end_to_end_holds_every_method(tmp_path, capsys):
    code, out, err = run_cli(["experiment", "synthesis", "--config", "merge-smoke", "--out", tmp_path], capsys)
    assert code in (0, None)
    md = (tmp_path / "synthesis_merge_smoke.md").read_text()
    assert "netanatomy experiment synthesis --config merge-smoke" in md
    for name in (*mx.MERGE_METHODS, "uniform soup", "greedy soup", "start", "member 0", "member 1", "member 2"):
        assert f"| {name} |" in md, name
    assert (tmp_path / "synthesis_merge_smoke.json").is_file()


def _row(method, params, val, test):
    return {"method": method, "params": params, "group": "merge",
            "val": {"tasks": [val, val], "mean": val, "all": val},
            "test": {"tasks": [test, test], "mean": test, "all": test}}


def test_selection_uses_validation_not_test():
    res = {"rows": [_row("ties", {"density": 0.2}, 0.90, 0.10),   # best on validation, worst on test
                    _row("ties", {"density": 0.5}, 0.50, 0.99),   # best on test
                    _row("slerp", {"t": 0.5}, 0.40, 0.80)]}
    best = mx.select(res)
    assert best["ties"]["params"] == {"density": 0.2}
    assert best["slerp"]["params"] == {"t": 0.5}
    agg = mx.aggregate([res])
    assert agg["ties"]["mean"]["mean"] == pytest.approx(0.10)


def test_bad_config_name_is_one_line_error_exit_2(tmp_path, capsys):
    code, out, err = run_cli(["experiment", "synthesis", "--config", "merge-nope", "--out", tmp_path / "o"], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "merge-nope" in lines[0]
    assert not (tmp_path / "o").exists()


@needs_data
def test_smoke_config_over_seeds_aggregates_every_seed(tmp_path, capsys):
    code, out, err = run_cli(["experiment", "synthesis", "--config", "merge-smoke", "--seeds", "0,1", "--out", tmp_path], capsys)
    assert code in (0, None)
    import json

    doc = json.loads((tmp_path / "synthesis_merge_smoke.json").read_text())
    assert [r["seed"] for r in doc["results"]] == [0, 1]
    for m, a in doc["selected"].items():
        assert a["mean"]["n"] == 2 and len(a["params"]) == 2 and len(a["edges"]) == 2 and len(a["per_seed"]) == 2, m
    # the seeds differ (split, start, members), so the start's scores differ
    starts = [next(r for r in res["rows"] if r["method"] == "start")["test"]["mean"] for res in doc["results"]]
    assert starts[0] != starts[1]
    assert doc["selected"]["start"]["mean"]["mean"] == pytest.approx(sum(starts) / 2)
    md = (tmp_path / "synthesis_merge_smoke.md").read_text()
    assert "--config merge-smoke --seeds 0,1" in md and "mean ± std over 2 seeds" in md
    assert "## Every candidate, seed 0" in md and "## Every candidate, seed 1" in md
    assert "| method | seed 0 | seed 1 |" in md
    assert "post-hoc" not in md  # the smoke grid adds nothing to the first grid


def test_seed_and_seeds_together_is_an_error(tmp_path, capsys):
    code, out, err = run_cli(["experiment", "synthesis", "--config", "merge-smoke", "--seed", "1", "--seeds", "0,1",
                              "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--seeds" in err
    assert not (tmp_path / "o").exists()


def test_grid_edges_flag_lowest_and_highest_of_each_varied_parameter():
    grid = [{"density": d, "lam": v} for d in (0.2, 0.5) for v in (0.1, 0.5, 1.0)]
    assert mx.grid_edges(grid, {"density": 0.2, "lam": 0.5}) == ["density 0.2 (lowest)"]
    assert mx.grid_edges(grid, {"density": 0.5, "lam": 0.1}) == ["density 0.5 (highest)", "lam 0.1 (lowest)"]
    assert mx.grid_edges([{"t": 0.5}], {"pair": [0, 1], "t": 0.5}) == []  # one value: not a grid dimension
    assert mx.grid_edges([{"t": 0.3}, {"t": 0.5}, {"t": 0.7}], {"pair": [0, 1], "t": 0.5}) == []


def test_grid_additions_lists_only_values_beyond_the_first_grid():
    added = mx.grid_additions(mx.GRIDS)
    assert added["task_arithmetic"] == {"lam": [0.1, 0.2]}
    assert "slerp" not in added and "model_stock" not in added
    for m, grid in mx.GRIDS_FIRST.items():  # the extension keeps every setting of the first grid
        assert all(p in mx.GRIDS[m] for p in grid), m
    assert mx.grid_additions(mx.CONFIGS["merge-smoke"].grids) == {}


def test_reading_flags_a_chosen_value_at_the_grid_edge():
    def res(seed, lam_best):
        rows = [_row("start", {}, 0.8, 0.8), _row("member 0", {"classes": [0]}, 0.3, 0.3),
                _row("member 1", {"classes": [1]}, 0.4, 0.4), _row("uniform soup", {}, 0.6, 0.6),
                _row("greedy soup", {}, 0.6, 0.6)]
        rows += [_row("task_arithmetic", {"lam": v}, 0.7 if v == lam_best else 0.5, 0.7 if v == lam_best else 0.5)
                 for v in (0.1, 0.5, 1.0)]
        return {"seed": seed, "rows": rows, "config": {"tasks": [[0], [1]], "widths": [4], "base_samples": 1, "base_lr": 0.1,
                "member_samples": 1, "member_lr": 0.1, "val_size": 1, "test_size": 1,
                "grids": {"task_arithmetic": [{"lam": v} for v in (0.1, 0.5, 1.0)]}}}
    md = mx.render_markdown([res(0, 0.1), res(1, 0.5)], "cmd")
    reading = md[md.index("## Reading"):]
    assert "task_arithmetic (seed 0: lam 0.1 (lowest))" in reading and "seed 1: lam" not in reading
    assert "lambda 0, which is the start itself" in reading and "drop rate" not in reading
    assert "above the start in mean test: none" in reading
    assert "above the uniform soup in mean test: task_arithmetic" in reading
    assert "| task_arithmetic | 0.7000 (lam 0.1) * | 0.7000 (lam 0.5) |" in md
    md2 = mx.render_markdown([res(0, 0.5)], "cmd")
    assert "No chosen value sits at an edge" in md2


def test_reading_names_the_limit_below_the_lowest_drop_rate():
    rows = [_row("start", {}, 0.8, 0.8), _row("member 0", {"classes": [0]}, 0.3, 0.3),
            _row("member 1", {"classes": [1]}, 0.4, 0.4), _row("uniform soup", {}, 0.6, 0.6), _row("greedy soup", {}, 0.6, 0.6),
            _row("dare_linear", {"p": 0.1, "lam": 0.5}, 0.7, 0.7), _row("dare_linear", {"p": 0.5, "lam": 0.5}, 0.6, 0.6),
            _row("dare_linear", {"p": 0.9, "lam": 0.5}, 0.5, 0.5)]
    res = {"seed": 0, "rows": rows, "config": {"tasks": [[0], [1]], "widths": [4], "base_samples": 1, "base_lr": 0.1,
           "member_samples": 1, "member_lr": 0.1, "val_size": 1, "test_size": 1,
           "grids": {"dare_linear": [{"p": p, "lam": 0.5} for p in (0.1, 0.5, 0.9)]}}}
    reading = mx.render_markdown([res], "cmd").split("## Reading")[1]
    assert "dare_linear (seed 0: p 0.1 (lowest))" in reading
    assert "p 0 (nothing dropped)" in reading and "lambda 0, which is the start" not in reading


def test_paired_difference_says_when_it_is_within_noise():
    agg = {"a": {"per_seed": [0.70, 0.72, 0.71]}, "b": {"per_seed": [0.71, 0.71, 0.71]},
           "c": {"per_seed": [0.60, 0.61, 0.62]}}
    assert "within 2 standard errors" in mx._diff(agg, "a", "b")
    assert "above in 3/3 seeds (beyond 2 standard errors" in mx._diff(agg, "a", "c")
