"""Reports: HTML (``html``), JSON and Parquet (``writers``), and the blocks analyses render to."""

from .blocks import Callout, Group, Image, Paragraph, Table
from .html import build_report, write_report
from .render import register_renderer
from .writers import write_json, write_model_json, write_parquet

__all__ = [
    "Callout",
    "Group",
    "Image",
    "Paragraph",
    "Table",
    "build_report",
    "register_renderer",
    "write_json",
    "write_model_json",
    "write_parquet",
    "write_report",
]
