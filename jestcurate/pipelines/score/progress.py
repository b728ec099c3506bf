"""What a score run tells its user: progress as it goes, then its report and summary."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from jestcurate import ui
from jestcurate.pipelines.score.encode import ShardResult

log = logging.getLogger(__name__)


@dataclass
class ScoreReport:
    out: Path | str  # the score set: a folder, or the URL its local mirror uploads to
    task_index: int
    num_tasks: int
    shards_in_task: int
    skipped: int
    results: list[ShardResult] = field(default_factory=list)
    seconds: float = 0.0
    startup_seconds: float = 0.0  # resolving inputs, loading the model, starting workers
    device: str = ""
    by_others: int = 0  # shards another run scored while this one ran

    @property
    def failed(self) -> list[ShardResult]:
        return [r for r in self.results if r.status != "ok"]

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.results)

    def error_reasons(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.results:
            total.update(r.error_reasons)
        return total


class Progress(Protocol):
    def start(self, total: int, skipped: int) -> None: ...
    def samples(self, n: int) -> None: ...
    def shard_done(self, result: ShardResult) -> None: ...


class NoProgress:
    def start(self, total: int, skipped: int) -> None:
        pass

    def samples(self, n: int) -> None:
        pass

    def shard_done(self, result: ShardResult) -> None:
        pass


class ScoreProgress:
    """Progress for `score`: rich bar over shards with samples/s, or a log line per shard and a
    throughput line every `every` seconds."""

    def __init__(self, interactive: bool | None = None, every: float = 60.0) -> None:
        self.interactive = ui.is_interactive() if interactive is None else interactive
        self.every = every
        self.samples_seen = 0
        self.done = 0
        self.total = 0
        self.began = time.monotonic()
        self.last_line = self.began
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ScoreProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, total: int, skipped: int) -> None:
        self.total, self.done = total, skipped
        self.began = self.last_line = time.monotonic()
        if skipped:
            log.info("%d of %d shards already done; skipping them", skipped, total)
        if self.interactive:
            from rich.progress import TextColumn

            self._bar = ui.progress_bar(
                "scoring",
                TextColumn("shards"),
                TextColumn("{task.fields[samples]:,} samples"),
                TextColumn("{task.fields[rate]:,.0f}/s"),
            )
            self._task = self._bar.add_task(
                "score", total=total, completed=skipped, samples=0, rate=0.0
            )
            self._bar.start()

    def _rate(self) -> float:
        return self.samples_seen / max(time.monotonic() - self.began, 1e-9)

    def samples(self, n: int) -> None:
        self.samples_seen += n
        if self._bar is not None:
            self._bar.update(self._task, samples=self.samples_seen, rate=self._rate())
        elif time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            log.info(
                "progress: %d/%d shards, %d samples, %.0f samples/s",
                self.done,
                self.total,
                self.samples_seen,
                self._rate(),
            )

    def shard_done(self, result: ShardResult) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        if result.status != "ok":
            log.warning("shard %s failed: %s", result.name, result.error)
        elif not self.interactive:
            log.info(
                "shard %s ok: %d samples, %d errors, %.1fs (%d/%d)",
                result.name,
                result.samples,
                result.errors,
                result.seconds,
                self.done,
                self.total,
            )


def print_summary(report: ScoreReport, console: Console = ui.stdout) -> None:
    done = [r for r in report.results if r.status == "ok"]
    table = ui.facts("jestcurate score")
    if report.num_tasks > 1:
        table.add_row("task", f"{report.task_index} of {report.num_tasks}")
    table.add_row("shards in this task", f"{report.shards_in_task:,}")
    table.add_row("  already done (skipped)", f"{report.skipped:,}")
    table.add_row("  scored now", f"{len(done):,}")
    if report.by_others:
        table.add_row("  scored meanwhile by another run", f"{report.by_others:,}")
    table.add_row("  failed", f"{len(report.failed):,}")
    samples = report.samples
    errors = sum(r.errors for r in report.results)
    table.add_row("samples read", f"{samples:,}")
    table.add_row("  scored", f"{samples - errors:,}")
    table.add_row("  errors", f"{errors:,}")
    for reason, count in report.error_reasons().most_common():
        table.add_row(f"    {reason}", f"{count:,}")
    if report.results:
        rate = samples / max(report.seconds - report.startup_seconds, 1e-9)
        table.add_row("throughput", f"{rate:,.1f} samples/s on {report.device}")
        table.add_row("start-up", f"{report.startup_seconds:,.1f} s")
    table.add_row("elapsed", f"{report.seconds:,.1f} s")
    console.print(table)
    console.print(f"score set: {report.out}", highlight=False, soft_wrap=True)
    for result in sorted(report.failed, key=lambda r: r.name):
        console.print(
            f"[red]failed[/red] {result.shard}: {result.error}", highlight=False, soft_wrap=True
        )
