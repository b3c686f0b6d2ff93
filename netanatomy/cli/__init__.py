"""The ``netanatomy`` command.

Exit codes: 0 success; 2 anything the user caused (missing, corrupt or hostile
file, bad option, layers that could not be analysed); 1 only for our own bugs.
User errors print one line on stderr, never a traceback.

The commands of each capability live in a module of this package
(``cli/spectral.py``, ``cli/zoo.py``, ...), listed in ``_COMMAND_MODULES``;
such a module defines ``register(app, experiment_app)``. The capability
packages themselves never import the command line.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer


def _freeze_heap() -> None:
    """Take every object alive now out of the cyclic garbage collector's scans
    (``gc.freeze``). By the time the command line is imported the process holds
    torch's and the other modules' few hundred thousand long-lived objects, and
    each full collection, triggered by allocation counts while the command runs
    and once more at exit, walks all of them: about 0.1-0.2 s each on this
    package's benchmark machine. Frozen objects are still freed by reference
    counting; only reference cycles among them stay (module-level objects, which
    live as long as the process anyway). Results do not depend on it."""
    gc.freeze()


_freeze_heap()  # torch and the package are imported by now (``netanatomy/__init__``)


def _exception_classes(attr: str) -> tuple[type, ...]:
    """``attr`` from Typer and from whichever click it runs on (newer Typer
    releases carry their own copy of click and do not install click itself).

    A separately installed click counts only once something has imported it
    (only then can its exceptions be raised): importing it just to name its
    classes costs startup time. ``main`` calls this in its ``except`` clauses,
    which Python evaluates only when an exception reaches them."""
    found: list[type] = []
    for mod_name in ("typer", "typer._click.exceptions", "click.exceptions"):
        mod = sys.modules.get(mod_name)
        if mod is None and not mod_name.startswith("click"):
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
        cls = getattr(mod, attr, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


from ..errors import UserError

app = typer.Typer(
    name="netanatomy",
    help="Read trained neural networks through their weights.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
experiment_app = typer.Typer(
    help="Reproduce the source papers' experiments at CPU scale.", no_args_is_help=True
)
app.add_typer(experiment_app, name="experiment")

_COMMAND_MODULES = (
    "netanatomy.cli.spectral",
    "netanatomy.cli.dynamics",
    "netanatomy.cli.zoo",
    "netanatomy.cli.synthesis",
    "netanatomy.cli.experiment",
)


from ._common import err_console as _err_console  # noqa: E402
from ._common import out_console as _out_console  # noqa: E402


# ---------------------------------------------------------------------------
# shared option parsing


def parse_settings(items: list[str] | None) -> dict[str, dict[str, str]]:
    """``["esd.mp_fit=true", ...]`` -> ``{"esd": {"mp_fit": "true"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        analysis, dot, option = key.partition(".")
        if not eq or not dot or not analysis or not option:
            raise UserError(f"--set takes ANALYSIS.OPTION=VALUE, got {item!r}")
        out.setdefault(analysis.strip(), {})[option.strip()] = value.strip()
    return out


def parse_only(only: str | None) -> list[str] | None:
    if only is None:
        return None
    names = [n.strip() for n in only.split(",") if n.strip()]
    if not names:
        raise UserError("--only needs at least one analysis name")
    return names


def load_model(path: str, key: str | None, layout: str):
    from ..io import load

    return load(path, key=key, layout=layout)


def progress_factory(console):
    """A rich progress bar per analysis (on stderr; quiet when not a terminal)."""
    from rich.progress import TextColumn

    from ._common import progress_bar

    progress = progress_bar(console, TextColumn("[bold]{task.fields[analysis]:<9}"), TextColumn("{task.description}"))
    tasks: dict[str, int] = {}

    def for_analysis(name: str):
        def cb(label: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(label, total=total or 1, analysis=name)
            progress.update(tasks[name], completed=done, total=total or 1, description=label)

        return cb

    return progress, for_analysis


# ---------------------------------------------------------------------------
# commands

KeyOpt = typer.Option(None, "--key", help="Entry of a nested checkpoint to read (e.g. ema, model).")
LayoutOpt = typer.Option("auto", "--layout", help="Weight layout where the format does not say: auto, torch or tf.")


@app.command()
def inspect(
    model: str = typer.Argument(..., help="A weights file, a folder of shards, or a model folder."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    key: Optional[str] = KeyOpt,
    layout: str = LayoutOpt,
) -> None:
    """List the layers of a model: name, kind, shape, groups, parameters, graph neighbours."""
    m = load_model(model, key, layout)
    if json_out:
        from .._util import dumps

        doc = {
            "overview": m.overview(),
            "layers": [{k: v for k, v in l.describe().items() if k != "tensors"} for l in m.layers],
            "skipped": [vars(s) for s in m.skipped],
        }
        sys.stdout.write(dumps(doc, indent=1) + "\n")
        return
    from rich.markup import escape
    from rich.table import Table

    console = _out_console()
    ov = m.overview()
    console.print(
        f"[bold]{escape(m.name)}[/] ({m.format}): {len(m.layers)} layers, {ov['params']:,} parameters"
        + (f", graph from {m.graph.source}" if m.graph else ", no graph")
    )
    for note in m.notes:
        console.print(f"note: {escape(note)}")
    t = Table(show_edge=False, pad_edge=False)
    for col in ("layer", "kind", "shape", "groups", "params", "dtype", "feeds"):
        t.add_column(
            col,
            justify="right" if col in ("groups", "params") else "left",
            no_wrap=col != "feeds",
            overflow="fold",
        )
    for l in m.layers:
        kind = str(l.kind) + (" (depthwise)" if l.depthwise else "") + (f":{l.role}" if l.role else "")
        t.add_row(
            escape(l.name),
            escape(kind),
            "x".join(map(str, l.shape)),
            str(l.groups),
            f"{l.num_params:,}",
            l.dtype,
            escape(", ".join(e.dst for e in m.successors(l.name))),
        )
    console.print(t)
    if m.skipped:
        console.print(f"{len(m.skipped)} tensors not analysed:")
        for s in m.skipped:
            console.print(f"  {s.key} {list(s.shape)} {s.dtype}: {s.reason}", markup=False)


@app.command()
def analyses() -> None:
    """List the registered analyses and their options."""
    import dataclasses

    from ..analysis import available_analyses, get_analysis

    console = _out_console()
    for name in available_analyses():
        cls = get_analysis(name)
        console.print(f"[bold]{name}[/]: {cls.title}")
        if dataclasses.is_dataclass(cls.Options):
            for f in dataclasses.fields(cls.Options):
                default = f.default if f.default is not dataclasses.MISSING else "(required)"
                console.print(f"    --set {name}.{f.name}={default}")


@app.command()
def analyze(
    model: str = typer.Argument(..., help="A weights file, a folder of shards, or a model folder."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated analyses to run (default: all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: ./netanatomy-<model>)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Analysis option, ANALYSIS.OPTION=VALUE; repeatable."),
    key: Optional[str] = KeyOpt,
    layout: str = LayoutOpt,
    no_report: bool = typer.Option(False, "--no-report", help="Write JSON and Parquet only."),
) -> None:
    """Run the analyses; write report.html and, per analysis, JSON and Parquet records."""
    names = parse_only(only)
    settings = parse_settings(set_)
    m = load_model(model, key, layout)
    out_dir = out or Path(f"netanatomy-{m.name}")
    raise typer.Exit(run_and_write(m, names, settings, out_dir, report=not no_report))


def run_and_write(m, names, settings, out_dir: Path, report: bool = True) -> int:
    """Run analyses on a loaded model and write every output; return the exit code."""
    from ..analysis import run_analyses
    from ..report import write_json, write_model_json, write_parquet, write_report

    err = _err_console()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    progress, factory = progress_factory(err)
    with progress:
        results = run_analyses(m, names, settings, progress=factory)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_model_json(m, out_dir / "model.json")
    for _, result in results:
        write_json(result, out_dir / f"{result.analysis}.json")
        write_parquet(result, out_dir / f"{result.analysis}.parquet")
    if report:
        write_report(m, results, out_dir / "report.html")
    failed = [(r.analysis, e) for _, r in results for e in r.errors]
    target = out_dir / "report.html" if report else out_dir
    summary = ", ".join(f"{r.analysis} {len(r.ok_records)} rows" for _, r in results)
    _out_console().print(f"wrote {target} ({summary})")
    if failed:
        layers = sorted({e["layer"] for _, e in failed})
        first = failed[0][1]
        internal = [e for _, e in failed if e.get("error_type") == "internal"]
        msg = (
            f"{len(layers)} layer{'s' if len(layers) != 1 else ''} could not be analysed "
            f"(first: {first['layer']}: {first['error']}); the other results are in {out_dir}"
        )
        err.print(("internal error: " if internal else "error: ") + msg, markup=False)
        return 1 if internal else 2
    return 0


@app.command()
def demo(
    out: Path = typer.Option(Path("netanatomy-demo"), "--out", help="Output folder."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated analyses to run (default: all)."),
) -> None:
    """Analyse the built-in demo CNN (trained on Fashion-MNIST) and write its report."""
    from ..demo import load_demo

    m = load_demo()
    raise typer.Exit(run_and_write(m, parse_only(only), {}, out))


def _register_plugins() -> None:
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
                continue  # that capability is not built (yet)
            raise
        mod.register(app, experiment_app)


_register_plugins()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map failures to one line and an exit code."""
    debug = bool(os.environ.get("NETANATOMY_DEBUG"))
    err = _err_console()
    _freeze_heap()  # the command modules and Typer's objects, imported since
    try:
        rv = app(args=argv, prog_name="netanatomy", standalone_mode=False)
    except _exception_classes("Exit") as exc:
        sys.exit(exc.exit_code)
    except _exception_classes("Abort"):
        err.print("interrupted")
        sys.exit(130)
    except _exception_classes("ClickException") as exc:  # bad option or argument
        if type(exc).__name__ == "NoArgsIsHelpError":  # help was shown
            sys.exit(0)
        err.print(f"error: {exc.format_message()} (see netanatomy --help)", markup=False)
        sys.exit(2)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        err.print(
            f"internal error: {type(exc).__name__}: {exc} "
            "(a bug in netanatomy; NETANATOMY_DEBUG=1 shows the traceback)",
            markup=False,
        )
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
