"""``netanatomy average`` / ``soup`` / ``interpolate``: outputs and one-line errors."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from netanatomy.cli import main

from test_synthesis import PURE_PYTHON_EVAL


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(map(str, args)))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_error(code, err, match):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    assert match in lines[0], lines[0]


@pytest.fixture
def members(tmp_path):
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(4):
        p = tmp_path / f"m{i}.safetensors"
        scale = 0.2 if i < 3 else 3.0
        save_file({"w": torch.randn(6, 5, generator=g) * scale, "steps": torch.tensor(i)}, p)
        paths.append(p)
    return paths


def test_average_writes_hash_and_prints_it(tmp_path, members, capsys):
    out = tmp_path / "avg.safetensors"
    code, stdout, _ = run(["average", *members, "--out", out], capsys)
    assert code == 0
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in stdout
    ref = torch.stack([load_file(p)["w"].double() for p in members]).mean(0).float()
    got = load_file(out)
    assert torch.equal(got["w"], ref) and int(got["steps"]) == 3
    code, stdout, _ = run(["average", *members, "--out", tmp_path / "ema.safetensors", "--ema", "0.5", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["method"] == "ema"


def test_greedy_soup_command(tmp_path, members, capsys):
    script = tmp_path / "ev.py"
    script.write_text(PURE_PYTHON_EVAL)
    out = tmp_path / "soup.safetensors"
    cmd = f"{sys.executable} {script} {{model}}"
    code, stdout, _ = run(["soup", *members, "--out", out, "--greedy", "--eval", cmd, "--json"], capsys)
    assert code == 0, stdout
    doc = json.loads(stdout)
    assert doc["score"] >= doc["best_member_score"]
    assert "m3.safetensors" not in doc["ingredients"]  # the outlier is left out
    assert out.exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "no such file"),
        ("shapes", "shape mismatch for 'w'"),
        ("eval_fails", "exit code 5"),
        ("eval_garbage", "no number"),
        ("greedy_without_eval", "--greedy needs --eval"),
        ("out_is_input", "is also an input"),
    ],
)
def test_errors_exit_2_with_one_line(tmp_path, members, capsys, case, match):
    out = tmp_path / "out.safetensors"
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(6, 4), "steps": torch.tensor(0)}, bad)
    args = {
        "missing": ["average", members[0], tmp_path / "nope.safetensors", "--out", out],
        "shapes": ["average", members[0], bad, "--out", out],
        "eval_fails": ["soup", *members, "--out", out, "--greedy", "--eval", f"{sys.executable} -c 'import sys; sys.exit(5)'"],
        "eval_garbage": ["soup", *members, "--out", out, "--greedy", "--eval", f"{sys.executable} -c 'print(\"n/a\")'"],
        "greedy_without_eval": ["soup", *members, "--out", out, "--greedy"],
        "out_is_input": ["average", *members, "--out", members[0]],
    }[case]
    before = {p: p.read_bytes() for p in members}
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, match)
    assert not out.exists()
    assert all(p.read_bytes() == b for p, b in before.items())  # inputs untouched


def test_interpolate_command(tmp_path, members, capsys):
    script = tmp_path / "ev.py"
    script.write_text(PURE_PYTHON_EVAL)
    out = tmp_path / "curve.json"
    code, stdout, _ = run(
        ["interpolate", members[0], members[1], "--eval", f"{sys.executable} {script}", "--points", "3", "--higher-is-better", "--out", out],
        capsys,
    )
    assert code == 0 and "barrier" in stdout
    doc = json.loads(out.read_text())
    assert [r["alpha"] for r in doc["curve"]] == [0.0, 0.5, 1.0]
    assert doc["barrier"] == 0.0  # -||w||^2 is concave: the midpoint beats the line
