"""``netanatomy esd``: the spectral table in the terminal (``--describe`` shows what
would be computed without reading a tensor)."""

from __future__ import annotations

import math
from typing import Optional

import typer


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def register(app: typer.Typer, experiment_app: typer.Typer) -> None:
    @app.command("esd")
    def esd(
        model: str = typer.Argument(..., help="A weights file, a folder of shards, or a model folder."),
        base: Optional[str] = typer.Option(None, "--base", help="Base model: analyse W - W_base, layers matched by name."),
        mp_fit: bool = typer.Option(False, "--mp-fit", help="Fit the Marchenko-Pastur bulk."),
        randomize: bool = typer.Option(False, "--randomize", help="Compare with the entry-shuffled matrices."),
        seed: int = typer.Option(0, "--seed", help="Seed of the shuffles."),
        per_slice: bool = typer.Option(False, "--per-slice", help="Conv layers: also one row per kernel position."),
        describe_only: bool = typer.Option(False, "--describe", help="Show the matrices that would be analysed; compute nothing."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON records instead of a table."),
        spectrum: str = typer.Option("full", "--spectrum", help="full (every eigenvalue) or partial (the top only, faster)."),
        allocate: Optional[str] = typer.Option(
            None, "--allocate",
            help="Per-layer allocation from alpha_hill: sparsity=S[,epsilon=E][,blockwise=1] (AlphaPruning) or "
                 "lr[,lr_min_ratio=R][,lr_slope=K] (TempBalance); written to --out.",
        ),
        out: Optional[str] = typer.Option(None, "--out", help="File for --allocate: .csv for CSV, else JSON."),
    ) -> None:
        """Spectral health of each layer: power-law alpha of the eigenvalue spectrum and friends."""
        from ._common import out_console
        from rich.table import Table

        from .._util import dumps
        from ..io import load
        from ..spectral.analysis import SpectralAnalysis, SpectralOptions, describe

        from ..errors import UserError
        from ..spectral.allocate import allocate as make_allocation
        from ..spectral.allocate import parse_allocate

        if allocate is not None:
            parse_allocate(allocate)  # a bad spec fails before any tensor is read
            if not out:
                raise UserError("--allocate needs --out FILE (.json or .csv)")
        elif out:
            raise UserError("--out is the file of --allocate; give --allocate too")
        m = load(model)
        opts = SpectralOptions(base=base, mp_fit=mp_fit, randomize=randomize, seed=seed, per_slice=per_slice,
                               spectrum=spectrum)
        console = out_console()
        if describe_only:
            rows = describe(m, opts)
            if as_json:
                print(dumps(rows))
                return
            cols = ["layer", "kind", "N", "M", "slices", "num_evals", "precision", "dtype"]
        else:
            res = SpectralAnalysis().run(m, opts)
            rows = res.records
            if allocate is not None:
                params = {}
                for layer in m.layers:
                    n = 1
                    for d in layer.shape:
                        n *= int(d)
                    params[layer.name] = n // max(layer.fused, 1)
                recs = [dict(r, params=params.get(r["layer"], params.get(r["layer"].split("[")[0])))
                        for r in rows if not r.get("error")]
                al = make_allocation(recs, allocate)
                path = al.write(out)
            if as_json:
                print(dumps({"summary": res.summary, "records": rows}))
                return
            cols = ["layer", "N", "M", "alpha", "alpha_hill", "D", "num_pl_spikes", "alpha_weighted", "log_spectral_norm",
                    "stable_rank", "best_fit", "warning"]
            if mp_fit:
                cols.insert(-1, "num_spikes")
            if randomize:
                cols.insert(-1, "num_traps")
        t = Table(show_lines=False)
        for c in cols:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*[_fmt(r.get(c)) if not r.get("error") or c == "layer" else "" for c in cols[:-1]],
                      r.get("error") or _fmt(r.get(cols[-1])))
        console.print(t)
        if not describe_only:
            s = res.summary
            console.print(
                f"{len(rows)} rows; mean alpha {_fmt(s.get('alpha'))}; {s.get('over_trained', 0)} over-trained, "
                f"{s.get('under_trained', 0)} under-trained, {s.get('failed_fits', 0)} failed fits, "
                f"{s.get('layers_failed', 0)} errors; {res.seconds:.1f} s"
            )
            if allocate is not None:
                console.print(f"{al.kind} allocation over {len(al.rows)} layers (parameter-weighted mean "
                              f"{al.weighted_mean():.4f}; {len(al.skipped)} without alpha) written to {path}")
