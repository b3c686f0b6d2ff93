"""The self-contained HTML report: a model overview and one section per analysis.

Images are inlined as base64 PNG or SVG, styles are inline, the only script is
the small table sorter of sortable tables, and nothing is fetched from the
network, so the file opens from disk anywhere.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Sequence

from markupsafe import Markup, escape

from .._util import atomic_write_text
from ..analysis import Analysis, AnalysisResult
from ..model import Model
from .blocks import Callout, Group, Image, Paragraph, Svg, Table, format_value

# sorting and filtering of tables marked sortable: one small script, no network
_SORT_JS = Markup("""<script>(function(){if(window.naSort)return;window.naSort=1;
function key(td){var v=td.getAttribute('data-v');return v===null?td.textContent:parseFloat(v);}
document.addEventListener('click',function(e){var th=e.target.closest('table.sortable th');if(!th)return;
var tb=th.closest('table').tBodies[0],i=th.cellIndex,d=th.getAttribute('data-d')==='1'?-1:1;
th.setAttribute('data-d',d===1?'1':'0');var rs=Array.prototype.slice.call(tb.rows);
rs.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
if(typeof x==='number'&&typeof y==='number'){if(isNaN(x))return 1;if(isNaN(y))return -1;return d*(x-y);}
return d*String(x).localeCompare(String(y));});rs.forEach(function(r){tb.appendChild(r);});});
document.addEventListener('input',function(e){if(!e.target.classList.contains('tfilter'))return;
var q=e.target.value.toLowerCase(),t=e.target.nextElementSibling.querySelector('tbody');
Array.prototype.forEach.call(t.rows,function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)<0?'none':'';});});
})();</script>""")
from .render import render


def render_block(block) -> Markup:
    if isinstance(block, Paragraph):
        return Markup("<p>{}</p>").format(block.text)
    if isinstance(block, Callout):
        level = block.level if block.level in ("info", "good", "warn", "bad") else "info"
        return Markup('<div class="callout {}">{}</div>').format(level, block.text)
    if isinstance(block, Table):
        return render_table(block)
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        cap = Markup("<figcaption>{}</figcaption>").format(block.caption) if block.caption else ""
        return Markup('<figure><img alt="{}" src="data:image/png;base64,{}">{}</figure>').format(
            block.alt or block.caption, Markup(data), cap
        )
    if isinstance(block, Svg):
        cap = Markup("<figcaption>{}</figcaption>").format(block.caption) if block.caption else ""
        return Markup("<figure>{}{}</figure>").format(Markup(block.markup), cap)
    if isinstance(block, Group):
        inner = Markup("").join(render_block(b) for b in block.blocks)
        if block.folded:
            return Markup("<details><summary>{}</summary>{}</details>").format(block.title, inner)
        return Markup("<h3>{}</h3>{}").format(block.title, inner)
    raise TypeError(f"not a report block: {type(block).__name__}")


def render_table(table: Table) -> Markup:
    cols = table.column_names()
    rows = table.rows[: table.max_rows]
    head = Markup("").join(Markup("<th>{}</th>").format(c) for c in cols)
    body = []
    for r in rows:
        cls = Markup(' class="hl"') if table.highlight and r.get(table.highlight) else Markup("")
        if table.sortable:
            cells = Markup("").join(_sort_cell(r.get(c)) for c in cols)
        else:
            cells = Markup("").join(Markup("<td>{}</td>").format(format_value(r.get(c))) for c in cols)
        body.append(Markup("<tr{}>{}</tr>").format(cls, cells))
    more = ""
    if len(table.rows) > table.max_rows:
        more = Markup("<p class='desc'>{} more rows in the JSON / Parquet files.</p>").format(
            len(table.rows) - table.max_rows
        )
    cap = Markup("<caption>{}</caption>").format(table.caption) if table.caption else ""
    if table.sortable:
        return Markup('<input class="tfilter" type="search" placeholder="filter rows" aria-label="filter rows">'
                      '<div class="table-wrap"><table class="sortable">{}<thead><tr>{}</tr></thead><tbody>{}</tbody>'
                      '</table></div>{}{}').format(cap, head, Markup("").join(body), more, _SORT_JS)
    return Markup('<div class="table-wrap"><table>{}<thead><tr>{}</tr></thead><tbody>{}</tbody></table></div>{}').format(
        cap, head, Markup("").join(body), more
    )


def _sort_cell(v) -> Markup:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        num = "NaN" if v != v else repr(float(v))
        return Markup('<td data-v="{}">{}</td>').format(num, format_value(v))
    return Markup("<td>{}</td>").format(format_value(v))


def _section(analysis: Analysis, result: AnalysisResult) -> dict:
    try:
        blocks = render(analysis, result)
    except Exception as exc:  # a picture must never cost the numbers
        blocks = [
            Callout(f"The pictures for this section could not be drawn ({type(exc).__name__}: {exc}).", "warn"),
            Table.from_records(result.records),
        ]
    summary = [(k, format_value(v)) for k, v in result.summary.items() if not isinstance(v, (dict, list))]
    summary.append(("time", f"{result.seconds:.2f} s"))
    return {
        "anchor": result.analysis,
        "title": analysis.title or result.analysis,
        "description": analysis.description,
        "summary": summary,
        "errors": result.errors,
        "html": Markup("").join(render_block(b) for b in blocks),
    }


def build_report(model: Model, results: Sequence[tuple[Analysis, AnalysisResult]]) -> str:
    import jinja2

    from .. import __version__

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("netanatomy.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    layer_rows = []
    for layer in model.layers:
        d = layer.describe()
        layer_rows.append(
            {
                "layer": d["layer"],
                "kind": d["kind"],
                "shape": d["shape"],
                "groups": d["groups"],
                "params": d["params"],
                "dtype": d["dtype"],
                "type": d["module_type"] or "",
                "feeds": ", ".join(e.dst for e in model.successors(layer.name)),
                "note": d["note"] or "",
            }
        )
    skipped_rows = [{"tensor": s.key, "shape": list(s.shape), "dtype": s.dtype, "reason": s.reason} for s in model.skipped]
    pooled = ""
    if model.graph is not None:
        last = model.last_conv_before_global_pool()
        pooled = f"{last.name} (the last conv before global pooling)" if last else "no conv output is globally pooled"
    tpl = env.get_template("report.html.j2")
    return tpl.render(
        model=model.overview(),
        sections=[_section(a, r) for a, r in results],
        layer_table=Table(layer_rows),
        skipped_table=Table(skipped_rows),
        render_table=render_table,
        pooled=pooled,
        version=__version__,
    )


def write_report(model: Model, results: Sequence[tuple[Analysis, AnalysisResult]], path: str | Path) -> Path:
    return atomic_write_text(path, build_report(model, results))


__all__ = ["build_report", "write_report", "render_block", "render_table", "escape"]
