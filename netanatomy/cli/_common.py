"""What every command module shares: the consoles and the parsing of
comma-separated option values."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..errors import UserError

T = TypeVar("T")


def out_console():
    """Console on stdout; piped output gets a wide console so layer names are never cut."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=240)
    return console


def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def parse_list(text: str, convert: Callable[[str], T], option: str, kind: str) -> list[T]:
    """``"1, 2,3"`` -> ``[convert("1"), ...]``; empty items are skipped. A bad item
    is a one-line :class:`UserError` naming ``option`` and the expected ``kind``."""
    try:
        return [convert(x) for x in (s.strip() for s in text.split(",")) if x]
    except ValueError:
        raise UserError(f"{option} takes comma-separated {kind}, got {text!r}") from None


def progress_bar(console, *leading):
    """A transient rich progress bar on ``console`` (disabled when it is not a
    terminal): the ``leading`` columns, then bar, done/total, elapsed and the
    remaining time estimated from the rate so far."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(*leading, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)
