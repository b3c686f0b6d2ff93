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


def _validity(values: list):
    """The Arrow validity bitmap of ``values`` (None = null) and the null count;
    no bitmap when nothing is null."""
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    nulls = len(values) - int(valid.sum())
    return (np.packbits(valid, bitorder="little") if nulls else None), nulls


def _typed_array(values: list, kind: str):
    """An Arrow array of Python scalars (None = null) of one ``kind`` ("float",
    "int", "bool", "str"), assembled from its buffers. Values equal to what
    ``pa.array(values, type=...)`` gives; built this way because pyarrow's
    conversion of Python sequences imports pandas (a third of a second) when it
    is installed. Raises OverflowError for ints beyond int64, like pa.array."""
    import pyarrow as pa

    bitmap, nulls = _validity(values)
    n = len(values)
    buffers: list = [None if bitmap is None else pa.py_buffer(bitmap)]
    if kind == "str":
        encoded = [b"" if v is None else v.encode("utf-8") for v in values]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        if offsets[-1] >= 2**31:  # beyond 32-bit offsets: let pyarrow chunk it
            return pa.array(values, type=pa.string())
        buffers += [pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))]
        return pa.Array.from_buffers(pa.string(), n, buffers, null_count=nulls)
    if kind == "float":
        arrow_type, data = pa.float64(), np.array([0.0 if v is None else float(v) for v in values], dtype=np.float64)
    elif kind == "int":
        arrow_type, data = pa.int64(), np.array([0 if v is None else int(v) for v in values], dtype=np.int64)
    elif kind == "bool":
        arrow_type = pa.bool_()
        data = np.packbits(np.array([False if v is None else bool(v) for v in values], dtype=bool), bitorder="little")
    else:
        raise ValueError(f"unknown column kind {kind!r}")
    buffers.append(pa.py_buffer(data))
    return pa.Array.from_buffers(arrow_type, n, buffers, null_count=nulls)


def _parquet_column(values: list):
    """One Parquet column: lists and dicts as JSON text; ints mixed with floats as
    float64; a column whose values do not share one type (e.g. numbers and text)
    as text throughout."""
    import pyarrow as pa

    vals = [json.dumps(jsonable(v)) if isinstance(v, (list, tuple, dict)) else v for v in values]
    kinds = {_kind(v) for v in vals if v is not None}
    as_text = _typed_array([None if v is None else str(v) for v in vals], "str")
    if len(kinds) > 1 and not kinds <= {"int", "float"}:
        return as_text
    if not kinds:
        return pa.nulls(len(vals))
    try:
        if kinds == {"int", "float"} or kinds == {"float"}:
            return _typed_array(vals, "float")
        if kinds == {"int"}:
            return _typed_array(vals, "int")
        if kinds == {"bool"}:
            return _typed_array(vals, "bool")
        return _typed_array(vals, "str") if kinds == {"str"} else as_text
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return as_text


def records_table(records: list[dict]):
    """An Arrow table of the records (columns in order of first appearance),
    built with pyarrow alone and without pyarrow's sequence conversion, which
    imports pandas (a third of a second) when it is installed."""
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
