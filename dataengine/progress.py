"""One progress bar for the library's long stages (or none, for tests and quiet runs)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def bar(show: bool, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`: a rich bar over `total` items when `show`, else a no-op."""
    if not show:
        yield lambda _n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as p:
        task = p.add_task(label, total=total)
        yield lambda n: p.advance(task, n)
