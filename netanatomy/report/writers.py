"""Write analysis results as JSON and Parquet (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

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


def records_frame(records: list[dict]):
    """A DataFrame Parquet can store: lists and dicts become JSON text."""
    import pandas as pd

    flat = []
    for r in records:
        flat.append(
            {k: (json.dumps(jsonable(v)) if isinstance(v, (list, tuple, dict)) else v) for k, v in r.items()}
        )
    df = pd.DataFrame(flat)
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col] if v is not None}
            if len(kinds) > 1 or (kinds and not kinds <= {str}):
                df[col] = df[col].map(lambda v: None if v is None else str(v))
    return df


def write_parquet(result: AnalysisResult, path: str | Path) -> Path:
    df = records_frame(result.records)
    return atomic_write(path, lambda p: df.to_parquet(p, index=False))


def write_model_json(model: Model, path: str | Path) -> Path:
    doc = {
        "overview": model.overview(),
        "layers": [layer.describe() for layer in model.layers],
        "skipped": [vars(s) for s in model.skipped],
        "edges": [vars(e) for e in model.graph.edges] if model.graph else None,
    }
    return atomic_write_text(path, dumps(doc, indent=1))
