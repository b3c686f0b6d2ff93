"""The HTML report: self-contained, escaped, and renders in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import netanatomy as na
from netanatomy.analysis import AnalysisResult, LayerwiseAnalysis
from netanatomy.report import build_report
from netanatomy.report.blocks import Callout, Table

from conftest import TinyCNN, make

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium_console(html_path: Path) -> tuple[str, list[str]]:
    """Open the page headless; return the rendered DOM and the console messages."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", html_path.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=180,
        )
    console = [l for l in proc.stderr.splitlines() if ":CONSOLE" in l]
    return proc.stdout, console


def _results(model):
    return na.run_analyses(model, ["stats"])


def test_report_is_self_contained_and_escaped(tiny_cnn):
    model = na.load(tiny_cnn, name="<script>alert(1)</script>")
    html = build_report(model, _results(model))
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert "<script" not in html  # no scripts at all
    # nothing is fetched: every src is inline data
    assert re.findall(r'src="(?!data:)', html) == []
    assert not re.search(r'(href|src)="https?://', html)
    assert 'src="data:image/png;base64,' in html  # the stats figure (viz extra)
    assert "dw (the last conv before global pooling)" in html


def test_a_failing_render_keeps_the_numbers(tiny_cnn):
    class Broken(LayerwiseAnalysis):
        name = "broken"
        title = "Broken pictures"

        def render(self, result):
            raise RuntimeError("no pictures today")

    model = na.load(tiny_cnn)
    res = AnalysisResult("broken", records=[{"layer": "conv1", "value": 1.5}, {"layer": "fc", "error": "weight holds 1 NaN/Inf value"}])
    html = build_report(model, [(Broken(), res)])
    assert "no pictures today" in html and "1.5" in html
    assert "1 layer could not be analysed" in html


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/test.sh installs it)")
def test_console_detector_sees_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('marker-123'); nope();</script></body></html>")
    _, console = chromium_console(bad)
    assert any("marker-123" in l for l in console)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/test.sh installs it)")
def test_report_renders_in_chromium_without_console_errors(tmp_path):
    from netanatomy.cli import run_and_write

    model = na.load(make(TinyCNN))
    assert run_and_write(model, None, {}, tmp_path) == 0
    dom, console = chromium_console(tmp_path / "report.html")
    assert console == []
    assert "Model overview" in dom and "Weight statistics" in dom
    assert dom.count("<section") >= 2


def test_parquet_columns_keep_types_and_turn_mixed_values_into_text(tmp_path):
    import math

    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from netanatomy.report.writers import records_table

    recs = [
        {"layer": "a", "alpha": np.float64(1.5), "n": np.int64(3), "shape": [4, 5], "mix": 1.0, "ok": True},
        {"layer": "b", "alpha": math.nan, "n": None, "shape": {"k": 1}, "mix": "text", "ok": np.bool_(False), "late": 2},
    ]
    table = records_table(recs)
    types = {f.name: str(f.type) for f in table.schema}
    assert types == {"layer": "string", "alpha": "double", "n": "int64", "shape": "string", "mix": "string",
                     "ok": "bool", "late": "int64"}
    pq.write_table(table, tmp_path / "r.parquet")
    df = pd.read_parquet(tmp_path / "r.parquet")
    assert list(df["layer"]) == ["a", "b"] and df["alpha"][0] == 1.5 and math.isnan(df["alpha"][1])
    assert list(df["shape"]) == ["[4, 5]", '{"k": 1}'] and list(df["mix"]) == ["1.0", "text"]
    assert math.isnan(df["late"][0]) and df["late"][1] == 2
