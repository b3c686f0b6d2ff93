"""Report blocks: what an analysis's ``render`` returns. The report engine turns
them into escaped HTML, so analyses never write markup themselves."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Paragraph:
    text: str


@dataclass
class Callout:
    """A highlighted line; ``level`` is info, good, warn or bad."""

    text: str
    level: str = "info"


@dataclass
class Table:
    rows: list[dict]
    columns: list[str] | None = None
    caption: str = ""
    max_rows: int = 500
    highlight: str | None = None  # name of a boolean column that marks rows
    sortable: bool = False  # click a header to sort, a box to filter (small inline script)

    @classmethod
    def from_records(cls, records: Sequence[dict], columns: Sequence[str] | None = None, **kw):
        return cls(rows=list(records), columns=list(columns) if columns else None, **kw)

    def column_names(self) -> list[str]:
        if self.columns:
            return list(self.columns)
        cols: list[str] = []
        for r in self.rows:
            for k in r:
                if k not in cols and k != self.highlight:
                    cols.append(k)
        return cols


@dataclass
class Image:
    """A PNG picture. Build it with :meth:`from_figure` from a matplotlib figure."""

    png: bytes
    caption: str = ""
    alt: str = ""

    @classmethod
    def from_figure(cls, fig: Any, caption: str = "", dpi: int = 100) -> "Image":
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        return cls(png=buf.getvalue(), caption=caption, alt=caption)


@dataclass
class Svg:
    """An inline SVG picture made by :mod:`netanatomy.report.svg` (which escapes
    every text it writes); never markup from elsewhere."""

    markup: str
    caption: str = ""


@dataclass
class Group:
    """Blocks shown together under a small heading (collapsible when ``folded``)."""

    title: str
    blocks: list = field(default_factory=list)
    folded: bool = False


def format_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v)) if all(isinstance(x, int) for x in v) else ", ".join(map(format_value, v))
    return str(v)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
