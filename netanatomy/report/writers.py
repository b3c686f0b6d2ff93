"""Write analysis results as JSON and Parquet (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._util import atomic_write, atomic_write_text, dumps, jsonable
from ..analysis import AnalysisResult
from ..model import Model


def result_document(result: AnalysisResult) -> dict:
    return {
        "analysis": result.analysis,
        "summary": result.summary,
        "options": result.options,
        "seconds": result.seconds,
        "records": result.records,
    }


def write_json(result: AnalysisResult, path: str | Path) -> Path:
    return atomic_write_text(path, dumps(result_document(result), indent=1))


def _kind(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    return "str" if isinstance(v, str) else "other"


def _parquet_column(values: list):
    """One Parquet column: lists and dicts as JSON text; ints mixed with floats as
    float64; a column whose values do not share one type (e.g. numbers and text)
    as text throughout."""
    import pyarrow as pa

    vals = [json.dumps(jsonable(v)) if isinstance(v, (list, tuple, dict)) else v for v in values]
    kinds = {_kind(v) for v in vals if v is not None}
    as_text = pa.array([None if v is None else str(v) for v in vals], type=pa.string())
    if len(kinds) > 1 and not kinds <= {"int", "float"}:
        return as_text
    try:
        if kinds == {"int", "float"} or kinds == {"float"}:
            return pa.array([None if v is None else float(v) for v in vals], type=pa.float64())
        if kinds == {"int"}:
            return pa.array([None if v is None else int(v) for v in vals], type=pa.int64())
        if kinds == {"bool"}:
            return pa.array([None if v is None else bool(v) for v in vals], type=pa.bool_())
        return pa.array(vals) if kinds <= {"str"} else as_text
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return as_text


def records_table(records: list[dict]):
    """An Arrow table of the records (columns in order of first appearance),
    written with pyarrow alone: pandas costs a third of a second to import."""
    import pyarrow as pa

    names: dict[str, None] = {}
    for r in records:
        names.update(dict.fromkeys(r))
    return pa.table({k: _parquet_column([r.get(k) for r in records]) for k in names})


def write_parquet(result: AnalysisResult, path: str | Path) -> Path:
    import pyarrow.parquet as pq

    table = records_table(result.records)
    return atomic_write(path, lambda p: pq.write_table(table, p))


def write_model_json(model: Model, path: str | Path) -> Path:
    doc = {
        "overview": model.overview(),
        "layers": [layer.describe() for layer in model.layers],
        "skipped": [vars(s) for s in model.skipped],
        "edges": [vars(e) for e in model.graph.edges] if model.graph else None,
    }
    return atomic_write_text(path, dumps(doc, indent=1))
