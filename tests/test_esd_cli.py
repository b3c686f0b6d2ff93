"""``netanatomy esd --allocate`` and ``--spectrum``."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from netanatomy.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(map(str, args)))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture
def ckpt(tmp_path, tiny_state):
    p = tmp_path / "tiny.pt"
    torch.save(tiny_state, p)
    return p


def test_allocate_sparsity_json_and_csv(ckpt, tmp_path, capsys):
    out = tmp_path / "alloc.json"
    code, o, err = run(["esd", ckpt, "--allocate", "sparsity=0.7,epsilon=0.1", "--out", out], capsys)
    assert code in (0, None), err
    doc = json.loads(out.read_text())
    assert doc["kind"] == "sparsity" and doc["target"] == 0.7
    rows = doc["rows"]
    w = sum(r["params"] * r["value"] for r in rows) / sum(r["params"] for r in rows)
    assert w == pytest.approx(0.7)
    assert "alpha_hill" in o and "written to" in o
    out2 = tmp_path / "lr.csv"
    code, o, err = run(["esd", ckpt, "--allocate", "lr", "--out", out2], capsys)
    assert code in (0, None), err
    got = list(csv.DictReader(out2.open()))
    assert {r["layer"] for r in got} == {r["layer"] for r in rows}
    assert all(0.5 - 1e-12 <= float(r["lr"]) <= 1.5 + 1e-12 for r in got)


@pytest.mark.parametrize("args", [
    ["--allocate", "sparsity=1.2", "--out", "x.json"],
    ["--allocate", "sparsity=0.7"],
    ["--out", "x.json"],
    ["--spectrum", "dense"],
])
def test_bad_options_are_one_line_errors(ckpt, tmp_path, capsys, args):
    code, o, err = run(["esd", ckpt, *[str(tmp_path / a) if a.endswith(".json") else a for a in args]], capsys)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err


def test_partial_spectrum_from_the_cli(ckpt, capsys):
    code, o, err = run(["esd", ckpt, "--spectrum", "partial", "--json"], capsys)
    assert code in (0, None), err
    recs = json.loads(o)["records"]
    assert recs and all(r.get("spectrum") in ("full", "partial") for r in recs if not r.get("error"))


# modules the esd command line does not need on a small model: importing them
# would only add start-up time (pandas alone is about a third of a second)
NOT_FOR_ESD = ("pandas", "matplotlib", "scipy", "click", "netanatomy.banding", "netanatomy.branches", "netanatomy.zoo",
               "netanatomy.dynamics", "netanatomy.synthesis")


def _child_modules(tmp_path, body: str) -> list[str]:
    import os
    import subprocess
    import sys
    from pathlib import Path

    import netanatomy

    root = str(Path(netanatomy.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    code = "import sys, json\n" + body + f"\nprint(json.dumps([m for m in {NOT_FOR_ESD!r} if m in sys.modules]))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_command_line_imports_no_heavy_module(tmp_path):
    assert _child_modules(tmp_path, "import netanatomy.cli") == []


def test_analyze_only_esd_imports_no_heavy_module(ckpt, tmp_path):
    out = tmp_path / "out"
    body = (
        "from netanatomy.cli import main\n"
        "try:\n"
        f"    main(['analyze', {str(ckpt)!r}, '--only', 'esd', '--out', {str(out)!r}])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
    )
    assert _child_modules(tmp_path, body) == []
    assert {p.name for p in out.iterdir()} == {"esd.json", "esd.parquet", "model.json", "report.html"}
