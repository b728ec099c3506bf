"""Terminal output: logging setup, progress (a bar on a terminal, log lines in cron and Slurm
logs) and end-of-run summaries."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

if TYPE_CHECKING:
    from jestcurate.pipelines.score import ScoreReport, ShardResult

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


def _progress_bar(label: str, *columns: Any, transient: bool = False) -> Any:
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


class ScoreProgress:
    """Progress for `score`: rich bar over shards with samples/s, or a log line per shard and a
    throughput line every `every` seconds."""

    def __init__(self, interactive: bool | None = None, every: float = 60.0) -> None:
        self.interactive = is_interactive() if interactive is None else interactive
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

            self._bar = _progress_bar(
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

        bar = _progress_bar(label, TextColumn(unit), transient=True)
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


def _log_done(label: str, done: int, unit: str, seconds: float, every: float) -> None:
    # Steps that finish before a progress line was due are not worth a line of their own.
    level = logging.INFO if seconds >= every else logging.DEBUG
    log.log(level, "%s: %d %s in %.1fs", label, done, unit, seconds)


def print_score_summary(report: ScoreReport, console: Console = stdout) -> None:
    done = [r for r in report.results if r.status == "ok"]
    table = Table(title="jestcurate score", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
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


def print_select_summary(report: Any, console: Console = stdout) -> None:
    summary = report.summary
    counts = summary["counts"]
    table = Table(title=f"jestcurate select: {summary['method']}", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    if summary.get("score"):
        table.add_row("batch score", summary["score"])
    table.add_row("rows in score set", f"{counts['rows']:,}")
    table.add_row("  errors (never selected)", f"{counts['errors']:,}")
    if counts["below_min_clip_score"]:
        table.add_row("  below --min-clip-score", f"{counts['below_min_clip_score']:,}")
    table.add_row("eligible", f"{counts['eligible']:,}")
    if counts["tail_dropped"]:
        table.add_row("  tail (no full super-batch)", f"{counts['tail_dropped']:,}")
    batch = summary["parameters"]["batch_size"]
    table.add_row("batches", f"{counts['steps']:,} x {batch:,}")
    table.add_row("kept", f"{counts['kept']:,}")
    for name, value in summary["means"]["kept"].items():
        dropped = summary["means"]["dropped"].get(name)
        if value is not None and dropped is not None:
            table.add_row(f"  mean {name}", f"{value:.4f} kept, {dropped:.4f} dropped")
    if report.reused:
        table.add_row("", "already selected (reused)")
    else:
        table.add_row("elapsed", f"{report.seconds:,.1f} s")
    console.print(table)
    console.print(f"selection: {report.out}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def training_progress(label: str = "training") -> Iterator[Callable[[int, int, float], None]]:
    """A callback for train.run: a progress bar with the loss on a terminal, else a log line
    every minute and at the end."""
    if is_interactive():
        from rich.progress import TextColumn

        bar = _progress_bar(label, TextColumn("steps"), TextColumn("loss {task.fields[loss]}"))
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


def print_demo_summary(report: Any, console: Console = stdout) -> None:
    from jestcurate.pipelines.demo import table_rows

    table = Table(title="pool samples kept, by kind", title_justify="left")
    for name, justify in (
        ("kind", "left"),
        ("in pool", "right"),
        ("jest", "right"),
        ("random", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    jest, rand = report.noise_share("jest"), report.noise_share("random")
    console.print(
        f"mismatched, junk and blank pairs: {jest:.0%} of jest's batches, {rand:.0%} of random's",
        highlight=False,
    )
    out = report.out
    console.print(
        f"outputs in {out}: report.html (open it in a browser), reference.pt, learner.pt, "
        "scores/{reference,learner}, curated/{jest,random} (manifest.parquet, summary.json, "
        "uids.npy, shards/)",
        highlight=False,
        soft_wrap=True,
    )


def print_info(path: Any, info: dict[str, Any], console: Console = stdout) -> None:
    table = Table(
        title=f"{path} ({info['kind']})", show_header=False, box=None, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    if info["kind"] == "dedup":
        s = info["summary"]
        table.add_row("scores", f"{s['scores']['path']} ({s['scores']['rows']:,} rows)")
        for key, value in s["params"].items():
            table.add_row(f"  {key}", str(value))
        table.add_row("ok rows", f"{s['ok_rows']:,}")
        table.add_row("kept", f"{s['kept']:,}")
        table.add_row("dropped", f"{s['dropped_exact']:,} exact, {s['dropped_semantic']:,} near")
        table.add_row(
            "clusters",
            f"{s['clusters_used']:,} (largest {s['largest_cluster']:,}, "
            f"median {s['median_cluster']:,.0f} rows)",
        )
        table.add_row("took", f"{s['seconds']:.1f} s on {s['device']}")
        console.print(table)
        return
    if info["kind"] == "selection":
        s = info["summary"]
        table.add_row("method", s["method"] + (f" ({s['score']})" if s.get("score") else ""))
        for key, value in s["parameters"].items():
            if value is not None:
                table.add_row(f"  {key}", str(value))
        ref = s["inputs"]["reference"]
        table.add_row("reference", f"{ref['path']} ({ref['model']}, {ref['rows']:,} rows)")
        if s["inputs"].get("learner"):
            learner = s["inputs"]["learner"]
            table.add_row("learner", f"{learner['path']} ({learner['model']})")
        for key, value in s["counts"].items():
            if value is not None:
                table.add_row(key.replace("_", " "), f"{value:,}")
        for name, kept in s["means"]["kept"].items():
            dropped = s["means"]["dropped"].get(name)
            if kept is not None and dropped is not None:
                table.add_row(f"mean {name}", f"{kept:.4f} kept, {dropped:.4f} dropped")
        export = info.get("export")
        table.add_row(
            "export",
            f"{export['shards']} shards: {export['pattern']}"
            if export and "shards" in export
            else "none",
        )
        console.print(table)
        return
    meta = info["meta"]
    table.add_row(
        "model", f"{meta.get('model')} ({meta.get('loss')} loss, {meta.get('precision')})"
    )
    table.add_row(
        "pretrained", str(meta.get("pretrained") or f"random, seed {meta.get('init_seed')}")
    )
    table.add_row("role", str(meta.get("role")))
    table.add_row(
        "embedding", f"{meta.get('embed_dim')} dims, logit scale {meta.get('logit_scale'):.3f}"
    )
    states = ", ".join(f"{n} {state}" for state, n in sorted(info["shard_states"].items()))
    table.add_row("shards", f"{info['shards']:,} ({states})")
    table.add_row("samples", f"{info['samples']:,} ({info['ok']:,} ok, {info['errors']:,} errors)")
    for reason, count in info["reasons"].items():
        table.add_row(f"  {reason}", f"{count:,}")
    for column in ("clip_score", "ref_loss"):
        q = info[column]
        if q:
            table.add_row(column, "  ".join(f"{k} {v:.3f}" for k, v in q.items()))
    if info["failed"]:
        table.add_row("failed shards", ", ".join(info["failed"][:10]))
    console.print(table)


def print_status(found: dict[str, Any], console: Console = stdout, listed: int = 20) -> None:
    """`jestcurate status`, for a person: counts, then up to `listed` shards of each kind, one
    per line and unwrapped so paths can be copied (--json gives the whole lists)."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    lines: list[str] = []

    def some(items: list[str], label: str) -> None:
        lines.extend(f"{label} {item}" for item in items[:listed])
        if len(items) > listed:
            lines.append(f"{label} ... and {len(items) - listed:,} more")

    if found["kind"] == "export":
        table.add_row("shards written", f"{found['written']:,} of {found['shards']:,}")
        some(found["missing"], "[yellow]missing[/yellow]")
    else:
        pending = found["pending"]
        table.add_row("done", f"{found['done']:,}")
        table.add_row("failed", f"{len(found['failed']):,}")
        table.add_row("running", f"{len(found['running']):,}")
        table.add_row("pending", "(give INPUTS)" if pending is None else f"{len(pending):,}")
        if found["outside_inputs"]:
            table.add_row("not among INPUTS", f"{found['outside_inputs']:,}")
        some([f"{f['shard']}: {f['error']}" for f in found["failed"]], "[red]failed[/red]")
        some([f"{r['shard']} ({r['owner']})" for r in found["running"]], "[cyan]running[/cyan]")
        some(pending or [], "[yellow]pending[/yellow]")
    console.print(f"{found['out']} ({found['kind']})", highlight=False, soft_wrap=True)
    console.print(table)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
