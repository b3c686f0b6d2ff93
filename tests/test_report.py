"""The HTML report: self-contained, escaped, and renders in a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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


def this_checkout_env() -> dict:
    """The environment for a child Python that imports this checkout's package."""
    root = str(Path(na.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}


def _same_values(a: list, b: list) -> bool:
    def key(v):
        return ("nan",) if isinstance(v, float) and v != v else v

    return [key(v) for v in a] == [key(v) for v in b]


def test_parquet_columns_equal_pyarrow_conversion_of_the_same_values():
    """The columns are assembled from buffers (pyarrow's conversion of Python
    sequences imports pandas); they hold what ``pa.array`` makes of the values."""
    import math

    import numpy as np
    import pyarrow as pa

    from netanatomy.report.writers import records_table

    recs = [
        {"s": "a", "u": "é€𝄞", "f": np.float32(0.1), "i": np.int64(-3), "b": True, "n": None, "mixed": 1, "big": 2**70},
        {"s": "", "u": None, "f": math.inf, "i": 2**62, "b": np.bool_(False), "n": None, "mixed": 2.5, "big": 1},
        {"s": None, "u": "x" * 1000, "f": math.nan, "i": None, "b": None, "n": None, "mixed": None, "big": None},
        {"s": "z", "f": None, "i": 0, "b": False, "mixed": -7},
    ]
    table = records_table(recs)
    table.validate(full=True)
    expect = {
        "s": pa.array([r.get("s") for r in recs], type=pa.string()),
        "u": pa.array([r.get("u") for r in recs], type=pa.string()),
        "f": pa.array([None if r.get("f") is None else float(r["f"]) for r in recs], type=pa.float64()),
        "i": pa.array([None if r.get("i") is None else int(r["i"]) for r in recs], type=pa.int64()),
        "b": pa.array([None if r.get("b") is None else bool(r["b"]) for r in recs], type=pa.bool_()),
        "n": pa.array([None] * len(recs)),
        "mixed": pa.array([None if r.get("mixed") is None else float(r["mixed"]) for r in recs], type=pa.float64()),
        "big": pa.array([None if r.get("big") is None else str(r["big"]) for r in recs], type=pa.string()),
    }
    assert table.column_names == list(expect)
    for name, want in expect.items():
        got = table[name].combine_chunks()
        assert got.type == want.type, name
        assert got.null_count == want.null_count, name
        assert _same_values(got.to_pylist(), want.to_pylist()), name


def test_writing_parquet_does_not_import_pandas(tmp_path):
    code = (
        "import sys\n"
        "from netanatomy.analysis import AnalysisResult\n"
        "from netanatomy.report.writers import write_parquet\n"
        "r = AnalysisResult('x', records=[{'layer': 'a', 'alpha': 2.5, 'n': 3, 'ok': True, 'shape': [1, 2]}])\n"
        f"write_parquet(r, {str(tmp_path / 'x.parquet')!r})\n"
        "print('pandas' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=this_checkout_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    import pandas as pd

    df = pd.read_parquet(tmp_path / "x.parquet")
    assert list(df.columns) == ["layer", "alpha", "n", "ok", "shape"] and df["shape"][0] == "[1, 2]"
