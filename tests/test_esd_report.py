"""The ``esd`` report at 224 layers: bounded size, no matplotlib, sortable and
filterable in a real browser without console errors."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from safetensors.torch import save_file

import netanatomy as na
from netanatomy.report import build_report
from netanatomy.spectral.analysis import SpectralAnalysis, SpectralOptions

from test_report import CHROMIUM, chromium_console

PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def big_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("esd224")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for b in range(32):
        for p in PARTS:
            shape = (24, 48) if p.startswith("mlp") else (24, 24)
            tensors[f"model.layers.{b}.{p}.weight"] = torch.randn(*shape, generator=g)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(24, 48)  # a failed fit
    save_file(tensors, str(d / "m.safetensors"))
    model = na.load(d / "m.safetensors")
    sys.modules.pop("matplotlib.pyplot", None)
    res = SpectralAnalysis().run(model, SpectralOptions(compare=False))
    html = build_report(model, [(SpectralAnalysis(), res)])
    path = d / "report.html"
    path.write_text(html)
    return res, html, path


def test_report_is_bounded_and_has_no_png(big_report):
    res, html, _ = big_report
    rows = [r for r in res.records if "slice" not in r]
    assert len(rows) == 224
    assert len(html.encode()) < 5 * 2**20
    assert "data:image/png" not in html
    assert html.count("<details><summary>model.layers.") == 224  # one collapsed ESD per layer
    assert html.count("<svg") >= 224 + 2
    # flagged layers (among them the zero matrix's failed fit) come first in the table
    body = html[html.index('<table class="sortable">'):]
    body = body[: body.index("</table>")]
    order = re.findall(r"<tr><td>([^<]*)</td>", body)
    assert len(order) == 224
    flagged = {r["layer"] for r in rows if r.get("warning")}
    assert "model.layers.0.mlp.up_proj" in flagged and 0 < len(flagged) < 224
    assert set(order[: len(flagged)]) == flagged


PROBE = """<script>
window.addEventListener('load', function () {
  var t = document.querySelector('table.sortable'), ths = t.tHead.rows[0].cells, col = -1;
  for (var i = 0; i < ths.length; i++) if (ths[i].textContent === 'alpha') col = i;
  ths[col].click();
  var v = Array.prototype.map.call(t.tBodies[0].rows, function (r) { return parseFloat(r.cells[col].getAttribute('data-v')); })
             .filter(function (x) { return !isNaN(x); });
  var asc = v.every(function (x, i) { return i === 0 || v[i - 1] <= x; });
  var f = document.querySelector('input.tfilter');
  f.value = 'layers.7.mlp.down';
  f.dispatchEvent(new Event('input', {bubbles: true}));
  var shown = Array.prototype.filter.call(t.tBodies[0].rows, function (r) { return r.style.display !== 'none'; }).length;
  document.body.setAttribute('data-probe', (asc && v.length > 200 ? 'sorted' : 'unsorted') + ':' + shown);
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/test.sh installs it)")
def test_report_sorts_and_filters_in_chromium_without_console_errors(big_report, tmp_path):
    _, html, path = big_report
    dom, console = chromium_console(path)
    assert console == []
    assert "model.layers.31.mlp.down_proj" in dom
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE, 1))
    dom, console = chromium_console(probe)
    assert console == []
    assert 'data-probe="sorted:1"' in dom
