"""Terminal output: logging setup, progress (a bar on a terminal, log lines in cron and Slurm
logs) and end-of-run summaries."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

log = logging.getLogger("jestcurate")
stderr = Console(stderr=True)
stdout = Console()


def say(text: str) -> None:
    """A result line on stdout, unwrapped (paths stay copyable) and not colour-guessed."""
    stdout.print(text, highlight=False, soft_wrap=True)


def note(text: str) -> None:
    """An advice line on stderr, like say()."""
    stderr.print(text, highlight=False, soft_wrap=True)


def is_interactive() -> bool:
    """A progress bar only when a person watches; cron and Slurm get plain lines."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time, so redirection after setup still works."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if is_interactive():
        handler: logging.Handler = RichHandler(console=stderr, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level)


def progress_bar(label: str, *columns: Any, transient: bool = False) -> Any:
    """A rich progress bar: label, bar, done/total, the given columns, elapsed and remaining."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=transient,
    )


@contextlib.contextmanager
def step_progress(
    label: str, total: int, unit: str, every: float = 60.0
) -> Iterator[Callable[[], None]]:
    """A progress bar on a terminal, a log line every `every` seconds elsewhere; yields the
    function to call once per unit of work."""
    done = 0
    began = last = time.monotonic()
    if is_interactive():
        from rich.progress import TextColumn

        bar = progress_bar(label, TextColumn(unit), transient=True)
        task = bar.add_task(label, total=total)
        with bar:
            yield lambda: bar.advance(task)
        _log_done(label, total, unit, time.monotonic() - began, every)
        return

    def tick() -> None:
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if now - last >= every:
            last = now
            log.info("%s: %d/%d %s", label, done, total, unit)

    yield tick
    _log_done(label, done, unit, time.monotonic() - began, every)


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """One long step with no natural unit of progress (k-means): a spinner on a terminal, a
    start and an end log line elsewhere."""
    began = time.monotonic()
    if is_interactive():
        with stderr.status(label):
            yield
    else:
        log.info("%s ...", label)
        yield
    log.info("%s: done in %.1f s", label, time.monotonic() - began)


def facts(title: str | None = None, justify: str = "right", **options: Any) -> Table:
    """A two-column table of labelled values (summaries, info): bold labels, no borders."""
    table = Table(title=title, show_header=False, box=None, **options)
    table.add_column(style="bold")
    table.add_column(justify=justify)  # type: ignore[arg-type]
    return table


def _log_done(label: str, done: int, unit: str, seconds: float, every: float) -> None:
    # Steps that finish before a progress line was due are not worth a line of their own.
    level = logging.INFO if seconds >= every else logging.DEBUG
    log.log(level, "%s: %d %s in %.1fs", label, done, unit, seconds)


@contextlib.contextmanager
def training_progress(label: str = "training") -> Iterator[Callable[[int, int, float], None]]:
    """A callback for train.run: a progress bar with the loss on a terminal, else a log line
    every minute and at the end."""
    if is_interactive():
        from rich.progress import TextColumn

        bar = progress_bar(label, TextColumn("steps"), TextColumn("loss {task.fields[loss]}"))
        task = bar.add_task(label, total=None, loss="-")

        def update(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")

        with bar:
            yield update
        return
    last = [time.monotonic()]

    def line(step: int, total: int, loss: float) -> None:
        if time.monotonic() - last[0] >= 60 or step == total:
            last[0] = time.monotonic()
            log.info("%s: step %d/%d, loss %.4f", label, step, total, loss)

    yield line
