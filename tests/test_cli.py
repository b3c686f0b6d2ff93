"""The command line: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from netanatomy.cli import main

from conftest import TinyCNN, make


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(map(str, args)))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_error(code, err, expected_code=2, match=None):
    assert code == expected_code
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    if match:
        assert match in lines[0], lines[0]


@pytest.fixture
def ckpt(tmp_path, tiny_state):
    p = tmp_path / "tiny.pt"
    torch.save(tiny_state, p)
    return p


def test_inspect_table_and_json(ckpt, capsys):
    code, out, err = run(["inspect", ckpt], capsys)
    assert code == 0 and "conv2" in out and "conv2d" in out and "5 layers" in out
    code, out, err = run(["inspect", ckpt, "--json"], capsys)
    doc = json.loads(out)
    assert code == 0
    assert [l["layer"] for l in doc["layers"]] == ["conv1", "bn1", "conv2", "dw", "fc"]
    assert doc["layers"][2]["shape"] == [16, 4, 3, 3]


def test_analyze_writes_json_parquet_report(ckpt, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(["analyze", ckpt, "--only", "stats", "--out", out_dir], capsys)
    assert code == 0, err
    doc = json.loads((out_dir / "stats.json").read_text())
    assert doc["analysis"] == "stats"
    assert [r["layer"] for r in doc["records"]] == ["conv1", "bn1", "conv2", "dw", "fc"]
    df = pd.read_parquet(out_dir / "stats.parquet")
    assert list(df["layer"]) == ["conv1", "bn1", "conv2", "dw", "fc"]
    assert np.allclose(df["std"].to_numpy(), [r["std"] for r in doc["records"]])
    html = (out_dir / "report.html").read_text()
    assert "Weight statistics" in html and "conv2" in html
    assert json.loads((out_dir / "model.json").read_text())["overview"]["layers"] == 5


def test_analyze_options_are_validated(ckpt, tmp_path, capsys):
    code, _, err = run(["analyze", ckpt, "--only", "stats", "--set", "stats.zero_tol=abc", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, match="bad value")
    code, _, err = run(["analyze", ckpt, "--only", "stats", "--set", "stats.nope=1", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, match="no option")
    code, _, err = run(["analyze", ckpt, "--only", "stats", "--set", "garbage", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, match="ANALYSIS.OPTION=VALUE")
    code, _, err = run(["analyze", ckpt, "--only", "nosuch"], capsys)
    assert_one_line_error(code, err, match="unknown analysis")
    code, _, err = run(["analyze", ckpt, "--bogus-flag"], capsys)
    assert_one_line_error(code, err, match="--bogus-flag")
    code, _, err = run(["analyze", ckpt, "--only", "stats", "--set", "stats.zero_tol=0.01", "--out", tmp_path / "ok"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "ok" / "stats.json").read_text())["options"]["zero_tol"] == 0.01


class _Evil:
    def __reduce__(self):
        return (print, ("should never run",))


def _bad_inputs(tmp_path, tiny_state):
    cases = {}
    cases["missing path"] = tmp_path / "does-not-exist.pt"
    empty = tmp_path / "emptydir"
    empty.mkdir()
    cases["folder without weights"] = empty
    st = tmp_path / "trunc.safetensors"
    save_file(tiny_state, str(st))
    st.write_bytes(st.read_bytes()[:-64])
    cases["truncated safetensors"] = st
    for suffix in (".pt", ".pth", ".bin", ".safetensors", ".onnx", ".npz"):
        p = tmp_path / f"random{suffix}"
        p.write_bytes(np.random.default_rng(len(suffix)).bytes(2048))
        cases[f"random bytes {suffix}"] = p
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": _Evil()}))
    cases["code-running pickle"] = evil
    ids = tmp_path / "noweights.safetensors"
    save_file({"position_ids": torch.arange(4)}, str(ids))
    cases["empty model"] = ids
    return cases


@pytest.mark.parametrize("command", ["inspect", "analyze"])
def test_bad_inputs_exit_2_with_one_line(tmp_path, tiny_state, capsys, command):
    for what, path in _bad_inputs(tmp_path, tiny_state).items():
        args = [command, path] + (["--out", tmp_path / "never"] if command == "analyze" else [])
        code, out, err = run(args, capsys)
        assert "should never run" not in out + err
        assert_one_line_error(code, err)
    assert not (tmp_path / "never").exists()


def test_nan_layers_reported_and_exit_2(tmp_path, tiny_state, capsys):
    tiny_state["conv2.weight"][0, 0, 0, 0] = float("nan")
    p = tmp_path / "nan.pt"
    torch.save(tiny_state, p)
    out_dir = tmp_path / "out"
    code, out, err = run(["analyze", p, "--only", "stats", "--out", out_dir], capsys)
    assert_one_line_error(code, err, match="conv2")
    doc = json.loads((out_dir / "stats.json").read_text())
    good = [r["layer"] for r in doc["records"] if not r.get("error")]
    assert good == ["conv1", "bn1", "dw", "fc"]
    assert "NaN" in [r for r in doc["records"] if r["layer"] == "conv2"][0]["error"]
    assert (out_dir / "report.html").exists()


def test_entry_point_subprocess(tmp_path, tiny_state):
    p = tmp_path / "m.safetensors"
    save_file(tiny_state, str(p))
    ok = subprocess.run([sys.executable, "-m", "netanatomy", "inspect", str(p)], capture_output=True, text=True)
    assert ok.returncode == 0 and "conv1" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "netanatomy", "inspect", str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


def test_progress_bar_shows_counts_and_a_remaining_time():
    import io

    from rich.console import Console
    from rich.progress import TextColumn

    from netanatomy.cli._common import progress_bar

    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    bar = progress_bar(console, TextColumn("esd"))
    with bar:
        task = bar.add_task("layers", total=4)
        for i in range(4):
            bar.update(task, completed=i + 1)
            bar.refresh()
    text = console.file.getvalue()
    assert "4/4" in text and "eta" in text
    quiet = progress_bar(Console(file=io.StringIO()), TextColumn("esd"))  # not a terminal: disabled
    assert quiet.disable
