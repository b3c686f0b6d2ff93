"""``netanatomy width RUN``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError


def load_run(run: str, key: str | None = None):
    """A width record from a run folder, its ``width_curves.parquet``, or a folder of
    per-epoch checkpoints (post-hoc mode)."""
    from ..dynamics.posthoc import curves_from_checkpoints
    from ..dynamics.record import CURVES, WidthRecord

    p = Path(run)
    if not p.exists():
        raise UserError(f"{run}: no such file or folder")
    if p.is_file():
        if p.suffix != ".parquet":
            raise UserError(f"{run}: give a run folder, its {CURVES}, or a folder of per-epoch checkpoints")
        return WidthRecord.load(p)
    if (p / CURVES).exists():
        return WidthRecord.load(p)
    return curves_from_checkpoints(p, key=key)


def analyse_run(run: str, out: Path, *, tau=0.2, floor=0.1, window=5, axis=None, grow=2.0, target=1.0,
                min_scale=0.25, multiple=1, key=None, report=True) -> tuple:
    from .._util import atomic_write, atomic_write_text, dumps
    from ..dynamics.plan import make_plan
    from ..dynamics.rule import RuleOptions
    from ..dynamics.width import analyze_record

    if axis not in (None, "epoch", "step"):
        raise UserError("--axis is epoch or step")
    if tau <= 0 or tau >= 1:
        raise UserError("--tau must be in (0, 1)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    rec = load_run(run, key)
    if rec.curves.empty:
        raise UserError(f"{run}: the run holds no record points")
    analysis = analyze_record(rec, RuleOptions(tau=tau, floor=floor, window=window), axis)
    plan = make_plan(analysis, rec.meta, grow=grow, target=target, min_scale=min_scale, multiple=multiple)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "width_verdicts.json", dumps({"stages": analysis.stages, "options": analysis.options,
                                                          "layers": analysis.layers}, indent=1))
    df = analysis.to_frame()
    atomic_write(out / "width_verdicts.parquet", lambda p: df.to_parquet(p, index=False))
    atomic_write_text(out / "width_plan.json", dumps(plan, indent=1))
    if not (Path(run) / "width_curves.parquet").exists() and Path(run).is_dir():
        rec.save(out / "curves")  # post-hoc curves, kept next to the verdicts
    if report:
        from ..dynamics.report import blocks, write_html

        write_html(out / "report.html", f"Width sufficiency: {rec.meta.get('model', run)}", blocks(rec, analysis, plan))
    return rec, analysis, plan


def register(app: typer.Typer, experiment_app: typer.Typer) -> None:
    @app.command("width")
    def width(
        run: str = typer.Argument(..., help="A run folder written by the width tracker, or a folder of per-epoch checkpoints."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: ./netanatomy-width-<run>)."),
        tau: float = typer.Option(0.2, "--tau", help="Drop from the peak, as a share of the peak, that separates DS from IS."),
        floor: float = typer.Option(0.1, "--floor", help="Smallest rise, as a share of the curve's top, for an IS or DS verdict."),
        window: int = typer.Option(5, "--window", help="Moving-average window of the training stages (points)."),
        axis: Optional[str] = typer.Option(None, "--axis", help="epoch or step (default: epoch when >= 5 epochs)."),
        grow: float = typer.Option(2.0, "--grow", help="Width factor for DS bottlenecks."),
        target: float = typer.Option(1.0, "--target", help="FLOPs of the plan relative to now."),
        min_scale: float = typer.Option(0.25, "--min-scale", help="Smallest factor an IS layer may be narrowed by."),
        multiple: int = typer.Option(1, "--multiple", help="Round planned widths to a multiple of this."),
        key: Optional[str] = typer.Option(None, "--key", help="Entry of nested checkpoints (post-hoc mode)."),
        no_report: bool = typer.Option(False, "--no-report", help="Write JSON and Parquet only."),
    ) -> None:
        """IS / DS verdict per layer, training stages, a width plan (JSON) and an HTML report."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        out_dir = out or Path(f"netanatomy-width-{Path(run).resolve().name}")
        rec, analysis, plan = analyse_run(run, out_dir, tau=tau, floor=floor, window=window, axis=axis, grow=grow,
                                          target=target, min_scale=min_scale, multiple=multiple, key=key,
                                          report=not no_report)
        con = Console(highlight=False, soft_wrap=True)
        t = Table(show_edge=False, pad_edge=False)
        for c in ("layer", "channels", "verdict", "conf", "peak", "final", "plan"):
            t.add_column(c)
        widths = {r["layer"]: r for r in plan["layers"]}
        for r in analysis.layers:
            p = widths.get(r["layer"], {})
            mark = " (bottleneck)" if r.get("bottleneck") else (f" (next to {r['ds_neighbour_of']})" if r.get("ds_neighbour_of") else "")
            t.add_row(escape(r["layer"]), str(r["channels"]), r["verdict"] + mark, f"{r['confidence']:.2f}",
                      f"{r['peak']:.3g}", f"{r['final']:.3g}", f"{p.get('width')} -> {p.get('new_width')}")
        con.print(t)
        con.print(f"plan: FLOPs x{plan['flops_ratio']:.3f}, parameters x{plan['params_ratio']:.3f}; wrote {out_dir}")
