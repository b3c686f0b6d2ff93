"""Analysis registry and the base class that runs every analysis.

An analysis is a class registered under a short name. It fills in hooks; the
base's :meth:`Analysis.run` owns the loop (the estimator contract of
scikit-learn, the shared base of captum's methods)::

    @register_analysis("esd")
    class SpectralAnalysis(Analysis):
        title = "Spectral health"
        Options = SpectralOptions          # a dataclass; CLI --set esd.key=value

        def prepare(self, model, options) -> context: ...        # optional
        def applies_to(self, layer) -> bool: ...                # optional
        def analyze_layer(self, layer, options, context) -> dict | list[dict]: ...
        def summarize(self, records, options, context) -> dict: ...  # optional
        def finalize(self, result, context) -> None: ...        # optional

``run`` calls, in order: ``prepare`` (per-run state goes in the context it
returns, never on ``self``), ``select_layers`` (by default the layers
``applies_to`` accepts), ``analyze_layer`` for each layer (in this thread, or in
``layer_workers`` threads with one BLAS thread each), ``summarize`` over the
records that did not fail, then ``finalize`` (ranks, extras, whole-model
results). A layer whose ``analyze_layer`` raises becomes one record with
``error`` and the other layers go on. The base adds ``layers_analysed`` /
``layers_failed`` to the summary and times the run.

Computation never prints or plots: report blocks are made from the result by
:mod:`netanatomy.report.render`, which imports the analyses, not the other way.

Built-in analyses are listed in ``_BUILTIN`` (module paths), imported on first
use so that importing netanatomy stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import time
import traceback
import typing
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

from .errors import LayerError, UserError
from .model import Layer, Model
from .parallel import limit_threads

# name -> module that registers it. Adding an analysis = one line here.
_BUILTIN: dict[str, str] = {
    "stats": "netanatomy.stats",
    "esd": "netanatomy.spectral.analysis",
    "banding": "netanatomy.banding.analysis",
    "branches": "netanatomy.branches.analysis",
}

_REGISTRY: dict[str, type["Analysis"]] = {}

Progress = Callable[[str, int, int], None]  # (label, done, total)


def register_analysis(name: str):
    """Class decorator that registers an analysis under ``name``."""

    def deco(cls: type[Analysis]) -> type[Analysis]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin(name: str) -> None:
    module = _BUILTIN[name]
    if name in _REGISTRY:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:  # an analysis not built yet
        if exc.name != module and not module.startswith(str(exc.name) + "."):
            raise


def _load_builtins() -> None:
    for name in _BUILTIN:
        _load_builtin(name)


def available_analyses() -> list[str]:
    """The built-in analyses in ``_BUILTIN`` order, then the others in the order
    they were registered (the same list whichever was imported first)."""
    _load_builtins()
    return [n for n in _BUILTIN if n in _REGISTRY] + [n for n in _REGISTRY if n not in _BUILTIN]


def get_analysis(name: str) -> type["Analysis"]:
    # a built-in analysis imports its own module only (``--only esd`` does not
    # import the other capabilities); an unknown name loads them all for the message
    if name in _BUILTIN:
        _load_builtin(name)
    if name not in _REGISTRY:
        _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY) or "none"
        raise UserError(f"unknown analysis {name!r} (available: {known})") from None


@dataclass
class AnalysisResult:
    """What an analysis found. ``records`` are JSON-friendly dicts with ``layer``."""

    analysis: str
    records: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # arrays for pictures; not serialised
    options: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.records if r.get("error")]

    @property
    def ok_records(self) -> list[dict]:
        return [r for r in self.records if not r.get("error")]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.records)


@dataclass
class NoOptions:
    pass


@dataclass
class RunContext:
    """The default per-run context: the model and the options. Analyses that
    need more state return their own object from ``prepare``."""

    model: Model
    options: Any


class Analysis:
    """Base class: subclasses set ``title`` and ``Options`` and implement
    ``analyze_layer`` (and, as needed, the other hooks); they do not override
    ``run``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    # -- hooks ----------------------------------------------------------------
    def prepare(self, model: Model, options: Any) -> Any:
        """Check the options, open what the run needs; returns the run's context."""
        return RunContext(model, options)

    def applies_to(self, layer: Layer) -> bool:
        return True

    def select_layers(self, model: Model, options: Any, context: Any) -> list[Layer]:
        """The layers ``analyze_layer`` is called on, in model order."""
        return [layer for layer in model.layers if self.applies_to(layer)]

    def analyze_layer(self, layer: Layer, options: Any, context: Any) -> dict | list[dict]:
        """One record (or several, e.g. per conv slice) for ``layer``."""
        raise NotImplementedError

    def layer_workers(self, layers: list[Layer], options: Any, context: Any) -> int:
        """How many layers run at once (threads); 1 runs them in this thread.
        ``analyze_layer`` must then be safe to call from several threads."""
        return 1

    def summarize(self, records: list[dict], options: Any, context: Any) -> dict:
        """Model-level summary from the records that did not fail."""
        return {}

    def finalize(self, result: AnalysisResult, context: Any) -> None:
        """Last look at the whole result (ranks, extras, whole-model records)."""

    # -- the loop ---------------------------------------------------------------
    def run(
        self, model: Model, options: Any = None, progress: Progress | None = None
    ) -> AnalysisResult:
        options = options if options is not None else self.make_options()
        start = time.perf_counter()
        context = self.prepare(model, options)
        layers = list(self.select_layers(model, options, context))
        workers = max(1, int(self.layer_workers(layers, options, context)))
        per_layer = run_layers(
            lambda layer: self.analyze_layer(layer, options, context), layers, workers, progress
        )
        result = AnalysisResult(
            analysis=self.name,
            records=[r for rows in per_layer for r in rows],
            options=dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {},
        )
        result.summary = dict(self.summarize(result.ok_records, options, context) or {})
        self.finalize(result, context)
        result.summary.setdefault("layers_analysed", len(result.ok_records))
        result.summary.setdefault("layers_failed", len(result.errors))
        result.seconds = time.perf_counter() - start
        return result

    # -- options --------------------------------------------------------------
    @classmethod
    def make_options(cls, values: dict[str, str] | None = None):
        """Build the Options dataclass from ``key -> text`` pairs (CLI ``--set``)."""
        values = values or {}
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"{cls.__name__}.Options must be a dataclass")
        hints = typing.get_type_hints(cls.Options)
        names = {f.name for f in dataclasses.fields(cls.Options)}
        kwargs = {}
        for key, text in values.items():
            if key not in names:
                raise UserError(
                    f"analysis {cls.name!r} has no option {key!r} "
                    f"(options: {', '.join(sorted(names)) or 'none'})"
                )
            kwargs[key] = _coerce(text, hints[key], f"{cls.name}.{key}")
        return cls.Options(**kwargs)


# The name under which layer-by-layer analyses were written before the base
# owned the loop; every analysis is now layer by layer.
LayerwiseAnalysis = Analysis


def run_layers(
    fn: Callable[[Layer], Any], layers: list[Layer], workers: int = 1, progress: Progress | None = None
) -> list[list[dict]]:
    """``run_layer_safely(fn, layer)`` for every layer, in input order.

    With ``workers > 1`` the layers run in that many threads, torch and the
    BLAS library limited to one thread each (the layers fill the cores);
    otherwise one after the other with the BLAS library held to torch's thread
    count. ``progress(label, done, total)`` is called as layers start (serial)
    or finish (threaded), and once at the end with an empty label.
    """
    n = len(layers)
    out: list[list[dict]] = [[] for _ in layers]
    if workers > 1 and n > 1:
        with limit_threads(1):
            with ThreadPoolExecutor(max_workers=min(workers, n)) as pool:
                futs = {pool.submit(run_layer_safely, fn, layer): i for i, layer in enumerate(layers)}
                for done, fut in enumerate(as_completed(futs), 1):
                    i = futs[fut]
                    out[i] = fut.result()
                    if progress:
                        progress(layers[i].name, done, n)
    else:
        with limit_threads(None):
            for i, layer in enumerate(layers):
                if progress:
                    progress(layer.name, i, n)
                out[i] = run_layer_safely(fn, layer)
    if progress:
        progress("", n, n)
    return out


def run_layer_safely(fn: Callable[..., Any], layer: Layer, *args) -> list[dict]:
    """Call ``fn(layer, *args)``; turn any failure into one error record."""
    try:
        out = fn(layer, *args)
    except (LayerError, UserError) as exc:
        return [{"layer": layer.name, "kind": str(layer.kind), "error": str(exc), "error_type": "user"}]
    except MemoryError:
        return [{"layer": layer.name, "kind": str(layer.kind), "error": "out of memory", "error_type": "user"}]
    except Exception as exc:  # a bug or an unforeseen layer; keep going, keep the reason
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return [
            {
                "layer": layer.name,
                "kind": str(layer.kind),
                "error": f"{type(exc).__name__}: {exc} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})",
                "error_type": "internal",
            }
        ]
    recs = [out] if isinstance(out, dict) else list(out)
    for r in recs:
        r.setdefault("layer", layer.name)
    return recs


def run_analyses(
    model: Model,
    names: Iterable[str] | None = None,
    settings: dict[str, dict[str, str]] | None = None,
    progress: Callable[[str], Progress] | None = None,
) -> list[tuple[Analysis, AnalysisResult]]:
    """Run the named analyses (all registered ones by default) on ``model``.

    ``settings`` maps analysis name -> {option: text}. ``progress(name)`` returns
    a per-analysis progress callback.
    """
    names = list(names) if names is not None else available_analyses()
    settings = settings or {}
    unknown = set(settings) - set(names)
    if unknown:
        raise UserError(f"--set names analyses that will not run: {', '.join(sorted(unknown))}")
    analyses = [(get_analysis(n)(), n) for n in names]
    prepared = [(a, a.make_options(settings.get(n))) for a, n in analyses]
    out = []
    for analysis, options in prepared:
        cb = progress(analysis.name) if progress else None
        out.append((analysis, analysis.run(model, options, cb)))
    return out


def _coerce(text: str, typ: Any, what: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        typ = args[0]
        origin = typing.get_origin(typ)
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typ is int:
            return int(text)
        if typ is float:
            v = float(text)
            if math.isnan(v):
                raise ValueError(text)
            return v
        if origin is typing.Literal:
            if text not in typing.get_args(typ):
                raise ValueError(text)
            return text
        if origin in (tuple, list) or typ in (tuple, list):
            return tuple(s.strip() for s in text.split(",") if s.strip())
        return text
    except ValueError:
        raise UserError(f"bad value {text!r} for option {what} (expected {typ})") from None
