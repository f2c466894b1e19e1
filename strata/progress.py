"""Progress bars for long CLI work (verify of a deep lineage, model export), on stderr.

Shown only when stderr is a terminal and the output is not `--json`: scripts and pipes
see exactly what they saw before. The bar is transient, so a finished command leaves
only its result on screen.

    with progress(args, "verifying") as advance:
        graph = verify(store, cid, on_node=advance)   # advance(done, total)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["Advance", "progress"]

# advance(done, total): `total` may grow as the work discovers more of itself (a lineage)
Advance = Callable[[int, int], None]


@contextmanager
def progress(args: argparse.Namespace, description: str, *, total: int | None = None) -> Iterator[Advance]:
    console = Console(stderr=True)
    if getattr(args, "json", False) or not console.is_terminal:
        yield lambda done, total: None
        return
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )  # fmt: skip
    with bar:
        task = bar.add_task(description, total=total)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
