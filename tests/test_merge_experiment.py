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
