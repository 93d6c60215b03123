"""Console output: rich progress bars and logging, on stderr so stdout stays for results."""
from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def setup_logging(level: str = "INFO") -> None:
    handler = RichHandler(console=console, show_path=False, log_time_format="[%X]")
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


def progress(iterable, description: str, total: int | None = None):
    """Iterate with a rich progress bar (rendered only on a terminal; silent in logs and CI)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    columns = [TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        yield from bar.track(iterable, total=total, description=description)
