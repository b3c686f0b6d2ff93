"""Executors: run many independent work items on a local process pool (the
default), in this process, or on a Ray cluster, with resume-safe results.

Two layers:

* An :class:`Executor` maps a picklable function over payloads and yields
  ``(index, outcome)`` as items finish. :class:`SerialExecutor` runs in this
  process, :class:`LocalExecutor` on a ``spawn`` process pool, and
  :class:`RayExecutor` on a Ray cluster (``ray`` is imported only when that
  backend is asked for). :func:`get_executor` picks one from CLI-style options
  (``--ray auto`` / ``--ray ADDRESS`` / ``--workers N``).
* :func:`run_resumable` runs a list of :class:`WorkItem` s so that a re-run skips
  the finished ones. A work function returns a :class:`WorkOutput` (a JSON record
  plus optional files as bytes). The *driver* writes the files and then a done
  record ``<out_dir>/.done/<key>.json``, each through :func:`atomic_write`, so a
  run killed at any moment leaves either a finished item or nothing that counts
  as finished. Because workers return bytes instead of writing files, Ray workers
  on other machines need no shared file system for their outputs.

Work functions run with one torch thread per worker unless ``threads`` says
otherwise, so that N workers use N cores and results do not depend on how many
threads a backend happens to give a task.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ._util import atomic_write, atomic_write_text, dumps
from .errors import UserError

__all__ = [
    "WorkItem",
    "WorkOutput",
    "WorkFailure",
    "Executor",
    "SerialExecutor",
    "LocalExecutor",
    "RayExecutor",
    "get_executor",
    "run_resumable",
    "RunSummary",
    "is_done",
    "read_done",
    "limit_threads",
]

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
DONE_DIR = ".done"


@dataclass
class WorkItem:
    """One unit of work: ``key`` names its done record (letters, digits, ``._-``);
    ``payload`` is the picklable argument given to the work function."""

    key: str
    payload: Any


@dataclass
class WorkOutput:
    """What a work function returns: a JSON-able ``record`` and optional
    ``files`` (path relative to the output folder -> bytes)."""

    record: Any
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class WorkFailure:
    """An item whose function raised; it is not marked done, so a re-run retries it."""

    key: str
    error: str
    traceback: str = ""


# ---------------------------------------------------------------------------
# executors


def _invoke(fn: Callable, payload: Any, threads: int | None) -> tuple[bool, Any]:
    """Run ``fn(payload)`` in a worker; never raise (a failure is returned)."""
    if threads is not None:
        try:
            import torch

            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        except Exception:  # pragma: no cover - torch is a requirement
            pass
    try:
        return True, fn(payload)
    except Exception as exc:  # one bad item never stops the others
        return False, (f"{type(exc).__name__}: {exc}", traceback.format_exc())


def _blas_limit(n: int):
    """Limit the threads of the BLAS library numpy / scipy use (scipy's syrk
    builds the spectral analysis' large Gram matrices); a no-op context when
    threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Within the block, torch uses ``n`` threads and the BLAS library as many
    (``None``: torch keeps its count and the BLAS library follows it). Used to
    run layers in threads, one core each, so that N threads use N cores."""
    import torch

    before = torch.get_num_threads()
    with _blas_limit(before if n is None else n):
        if n is not None and n != before:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)


class Executor(ABC):
    """Maps a function over payloads; yields ``(index, (ok, value))`` as items finish."""

    name = "executor"

    def __init__(self, threads: int | None = 1):
        self.threads = threads

    @abstractmethod
    def imap_unordered(self, fn: Callable, payloads: Sequence[Any]) -> Iterator[tuple[int, tuple[bool, Any]]]:
        ...

    def map(self, fn: Callable, payloads: Sequence[Any]) -> list[Any]:
        """Results in input order; the first failure raises ``RuntimeError``."""
        out: list[Any] = [None] * len(payloads)
        for i, (ok, value) in self.imap_unordered(fn, list(payloads)):
            if not ok:
                raise RuntimeError(f"work item {i} failed: {value[0]}")
            out[i] = value
        return out

    @property
    def workers(self) -> int:
        return 1

    def _windowed(self, payloads, limit: int, pending: dict, submit, wait_some, collect):
        """Keep at most ``limit`` items in flight (``pending``: handle -> index)
        and yield ``(index, result)`` as they finish; after ``cancel_pending``
        nothing new is submitted. ``collect`` returns None for an item that
        was cancelled before it started."""
        it = iter(enumerate(payloads))
        exhausted = False
        while True:
            while not exhausted and not self._stop and len(pending) < limit:
                try:
                    i, p = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[submit(p)] = i
            if not pending:
                return
            for h in wait_some(list(pending)):
                i = pending.pop(h)
                result = collect(h)
                if result is not None:
                    yield i, result

    def cancel_pending(self) -> None:
        """Start no further items of the running map; items already running
        still finish and are yielded."""
        self._stop = True

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"


class SerialExecutor(Executor):
    """Runs every item in this process, one after the other (debugging, tiny jobs)."""

    name = "serial"

    def __init__(self, threads: int | None = None):
        super().__init__(threads)

    def imap_unordered(self, fn, payloads):
        self._stop = False
        for i, p in enumerate(payloads):
            if self._stop:
                return
            yield i, _invoke(fn, p, self.threads)


class LocalExecutor(Executor):
    """A local process pool (``spawn`` start method, safe with torch's threads)."""

    name = "local"

    def __init__(self, workers: int | None = None, threads: int | None = 1, start_method: str = "spawn"):
        super().__init__(threads)
        self._workers = max(1, int(workers or os.cpu_count() or 1))
        self.start_method = start_method
        self._pool = None

    @property
    def workers(self) -> int:
        return self._workers

    def _get_pool(self):
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            env_threads = str(self.threads) if self.threads else None
            self._pool = ProcessPoolExecutor(
                max_workers=self._workers,
                mp_context=mp.get_context(self.start_method),
                initializer=_init_worker,
                initargs=(env_threads,),
            )
        return self._pool

    def imap_unordered(self, fn, payloads):
        self._stop = False
        if self._workers == 1 or len(payloads) <= 1:
            # no point paying process start-up for one item
            for i, p in enumerate(payloads):
                if self._stop:
                    return
                yield i, _invoke(fn, p, self.threads)
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        pool = self._get_pool()
        # At most one item per worker in flight: a ProcessPoolExecutor hands
        # submitted items to its workers ahead of time, and those can no longer
        # be cancelled, so submitting everything at once would let a stop
        # request (a time limit) start items long after it was made.
        futures: dict = {}
        self._futures = futures
        try:
            yield from self._windowed(
                payloads,
                self._workers,
                futures,
                submit=lambda p: pool.submit(_invoke, fn, p, self.threads),
                wait_some=lambda hs: wait(hs, return_when=FIRST_COMPLETED)[0],
                collect=lambda fut: None if fut.cancelled() else fut.result(),
            )
        finally:
            for fut in futures:
                fut.cancel()
            self._futures = {}

    def cancel_pending(self) -> None:
        self._stop = True
        for fut in getattr(self, "_futures", {}):
            fut.cancel()  # only items not started yet can be cancelled

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _init_worker(threads: str | None) -> None:
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)


class RayExecutor(Executor):
    """Ray backend. ``address``: ``"auto"`` (join a running cluster, else start a
    local one), ``"local"`` (always start a local one) or a cluster address such
    as ``ray://head:10001`` / ``head:6379``. Each task asks for one CPU."""

    name = "ray"

    def __init__(
        self,
        address: str = "auto",
        threads: int | None = 1,
        num_cpus: int | None = None,
        max_in_flight: int | None = None,
    ):
        super().__init__(threads)
        try:
            import ray
        except ImportError as exc:
            raise UserError("--ray needs the ray package: pip install 'netanatomy[ray]'") from exc
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            if address in ("local", "", None):
                ray.init(num_cpus=num_cpus, **kw)
            elif address == "auto":
                try:
                    ray.init(address="auto", **kw)
                except (ConnectionError, RuntimeError):
                    ray.init(num_cpus=num_cpus, **kw)
            else:
                try:
                    ray.init(address=address, **kw)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise UserError(f"--ray {address}: cannot connect to the Ray cluster ({exc})") from exc
            self._started = True
        self.max_in_flight = max_in_flight
        self._remote = ray.remote(num_cpus=1, max_retries=1)(_invoke)

    @property
    def workers(self) -> int:
        try:
            return int(self._ray.cluster_resources().get("CPU", 1))
        except Exception:  # pragma: no cover
            return 1

    def imap_unordered(self, fn, payloads):
        ray = self._ray
        fn_ref = ray.put(fn)
        limit = self.max_in_flight or max(2 * self.workers, 1)
        self._stop = False

        def collect(ref):
            try:
                return ray.get(ref)
            except Exception as exc:  # the worker died (not a Python error in fn)
                return False, (f"{type(exc).__name__}: {exc}", "")

        yield from self._windowed(
            payloads,
            limit,
            {},
            submit=lambda p: self._remote.remote(fn_ref, p, self.threads),
            wait_some=lambda hs: ray.wait(hs, num_returns=1)[0],
            collect=collect,
        )

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def get_executor(ray: str | None = None, workers: int | None = None, threads: int | None = 1) -> Executor:
    """The executor named by CLI options: ``ray`` set -> :class:`RayExecutor`;
    ``workers == 0`` -> :class:`SerialExecutor`; else :class:`LocalExecutor`."""
    if ray:
        return RayExecutor(ray, threads=threads)
    if workers is not None and workers < 0:
        raise UserError("--workers must be >= 0 (0 runs in this process)")
    if workers == 0:
        return SerialExecutor(threads=threads)
    return LocalExecutor(workers, threads=threads)


# ---------------------------------------------------------------------------
# resumable runs


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"work item key {key!r}: use 1-200 letters, digits, '.', '_' or '-'")


def done_path(out_dir: str | os.PathLike, key: str) -> Path:
    return Path(out_dir) / DONE_DIR / f"{key}.json"


def read_done(out_dir: str | os.PathLike, key: str) -> dict | None:
    """The done record of ``key`` if the item finished and its files are intact, else None.

    A file that does not parse, belongs to another key, lacks the completion
    mark, or lists an output file that is missing or has another size is not
    finished (a killed or tampered run is redone, never trusted)."""
    p = done_path(out_dir, key)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("complete") is not True or doc.get("key") != key:
        return None
    files = doc.get("files")
    if not isinstance(files, dict):
        return None
    root = Path(out_dir)
    for rel, meta in files.items():
        f = root / rel
        try:
            if not isinstance(meta, dict) or f.stat().st_size != meta.get("size"):
                return None
        except OSError:
            return None
    return doc


def is_done(out_dir: str | os.PathLike, key: str) -> bool:
    return read_done(out_dir, key) is not None


def _safe_rel(rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"output file {rel!r} must be a relative path inside the output folder")
    return p


def _commit(out_dir: Path, key: str, output: Any) -> dict:
    """Write an item's files, then its done record (each atomically)."""
    if not isinstance(output, WorkOutput):
        output = WorkOutput(record=output)
    meta = {}
    for rel, data in output.files.items():
        relp = _safe_rel(rel)
        atomic_write(out_dir / relp, lambda t, d=data: t.write_bytes(d))
        meta[relp.as_posix()] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    doc = {"key": key, "complete": True, "record": output.record, "files": meta}
    atomic_write_text(done_path(out_dir, key), dumps(doc))
    return doc


@dataclass
class RunSummary:
    """Outcome of :func:`run_resumable`: records by key (finished now or before),
    which keys were skipped as already finished, and failures."""

    records: dict[str, Any]
    ran: list[str]
    skipped: list[str]
    failures: list[WorkFailure]
    unfinished: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def run_resumable(
    fn: Callable[[Any], WorkOutput | Any],
    items: Iterable[WorkItem],
    out_dir: str | os.PathLike,
    executor: Executor | None = None,
    progress: Callable[[int, int], None] | None = None,
    time_limit: float | None = None,
) -> RunSummary:
    """Run ``fn(item.payload)`` for every item not finished yet in ``out_dir``.

    The function must be picklable (a module-level function) and return a
    :class:`WorkOutput` or a JSON-able record. Failures are collected, not
    raised; the failed items stay unfinished so a re-run retries them.
    ``time_limit`` (seconds): start no new item after that long; items already
    running finish and are kept; a re-run continues with the rest."""
    import time

    t0 = time.monotonic()
    items = list(items)
    seen: set[str] = set()
    for it in items:
        _check_key(it.key)
        if it.key in seen:
            raise ValueError(f"duplicate work item key {it.key!r}")
        seen.add(it.key)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, Any] = {}
    skipped: list[str] = []
    todo: list[WorkItem] = []
    for it in items:
        doc = read_done(out, it.key)
        if doc is not None:
            records[it.key] = doc["record"]
            skipped.append(it.key)
        else:
            todo.append(it)
    ran: list[str] = []
    failures: list[WorkFailure] = []
    total = len(items)
    if progress:
        progress(len(skipped), total)
    if todo:
        own = executor is None
        ex = executor or LocalExecutor()
        try:
            for i, (ok, value) in ex.imap_unordered(fn, [it.payload for it in todo]):
                key = todo[i].key
                if ok:
                    doc = _commit(out, key, value)
                    records[key] = doc["record"]
                    ran.append(key)
                else:
                    failures.append(WorkFailure(key, value[0], value[1]))
                if progress:
                    progress(len(skipped) + len(ran) + len(failures), total)
                if time_limit is not None and time.monotonic() - t0 > time_limit:
                    ex.cancel_pending()
        finally:
            if own:
                ex.close()
    ordered = {it.key: records[it.key] for it in items if it.key in records}
    failed = {f.key for f in failures}
    unfinished = [it.key for it in items if it.key not in records and it.key not in failed]
    return RunSummary(ordered, ran, skipped, failures, unfinished)
