"""Commands of the branch capability: ``netanatomy experiment branches``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError


def register(app: typer.Typer, experiment_app: typer.Typer) -> None:
    @experiment_app.command("branches")
    def experiment_branches(
        config: str = typer.Option("quick", "--config", help="smoke, quick or full."),
        out: Path = typer.Option(Path("results"), "--out", help="Folder for branches.md, branches_runs.json and pictures."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds (overrides the config)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Training steps per run (overrides the config)."),
        threads: int = typer.Option(1, "--threads", help="Torch threads (keep 1 on a shared machine)."),
    ) -> None:
        """Train small two-tower CNNs and their unbranched twins on offline photos; test whether the towers specialize."""
        from dataclasses import replace

        from rich.console import Console

        from ..experiments.branches import CONFIGS, run

        if config not in CONFIGS:
            raise UserError(f"unknown config {config!r} (choose {', '.join(CONFIGS)})")
        cfg = replace(CONFIGS[config], threads=threads)
        if seeds:
            try:
                cfg = replace(cfg, seeds=tuple(int(s) for s in seeds.split(",") if s.strip()))
            except ValueError:
                raise UserError(f"--seeds takes integers separated by commas, got {seeds!r}") from None
        if steps is not None:
            if steps < 1:
                raise UserError("--steps must be at least 1")
            cfg = replace(cfg, steps=steps)
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        err = Console(stderr=True, highlight=False)
        doc = run(cfg, out, log=lambda s: err.print(s, markup=False))
        Console(highlight=False).print(f"wrote {out / 'branches.md'} ({len(doc['runs'])} runs, {doc['wall_seconds'] / 60:.1f} min)")
