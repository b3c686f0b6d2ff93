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
