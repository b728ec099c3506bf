"""Writing into a score set, for `score` and `import` alike: the steps both take, in one place.

In the order a run takes them:

    writer = ScoreSetWriter(out, mirror)     # mirror: `out` is a remote set's local copy
    shards = writer.names(urls)              # named as earlier runs' markers name them
    writer.check(identity)                   # refuse a set made differently, before any work
    plan = writer.plan(mine, full)           # markers read, parts that no longer match them
                                             # forgotten; plan.todo: what has no ok marker
    writer.set_aside(plan, everyone, live)   # parts of no input shard to orphaned/
    writer.open(meta)                        # folders, dead writers' temp files, meta.json
    digest = writer.write_part(name, table)  # then per part: the part, atomically,
    writer.mark(name, {**marker, **digest})  # and its marker, last

A part is whole before its marker exists, so a crash at any point leaves at worst a part
without a marker, which the next run redoes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pyarrow as pa

from jestcurate.io.files import remove_stale_temps, write_json_atomic
from jestcurate.io.identity import check_meta, create_meta
from jestcurate.io.integrity import PartFiles, forget_unmatched, read_markers, set_aside_strays
from jestcurate.io.remote import Mirror, RemoteParts
from jestcurate.io.schema import DONE_DIR, META_NAME, PARTS_DIR, write_part
from jestcurate.io.shards import Shard, assign_names


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


@dataclass
class Plan(Generic[T]):
    """What a run has left to write, as `ScoreSetWriter.plan` found it."""

    todo: list[T]  # of the run's shards (or units), those with no ok marker, in their order
    forgotten: list[tuple[str, str]]  # (name, problem): parts that no longer matched a marker
    markers: dict[str, dict[str, Any]]  # the markers read, less the forgotten ones


class ScoreSetWriter:
    """Parts and markers written into the score set at `out`; with a `mirror`, `out` is the local
    copy of a set at a URL (markers only) and each part, marker and meta.json goes up too."""

    def __init__(self, out: Path, mirror: Mirror | None = None) -> None:
        self.out = out
        self.mirror = mirror
        # A remote set's local mirror holds the markers only: its parts are checked in one
        # listing of the URL.
        self.files = RemoteParts(mirror) if mirror is not None else PartFiles(out)

    def markers(self) -> dict[str, dict[str, Any]]:
        """The completion markers now on disk, by name."""
        return read_markers(self.out)

    def names(self, urls: list[str]) -> list[Shard]:
        """Shards named from their URLs, keeping the name each earlier run's marker gave one."""
        owners = {name: m.get("shard") for name, m in self.markers().items()}
        return assign_names(urls, owners)

    def check(self, identity: Mapping[str, Any]) -> None:
        """Refuse, in one line naming each field, a set made by another model, checkpoint,
        precision, decoder or role: a cheap check before anything loads or is written."""
        check_meta(self.out, identity)

    def plan(self, mine: Sequence[T], full: bool = False) -> Plan[T]:
        """Read the markers and forget those of `mine` whose part no longer matches (its size;
        with `full`, its sha256), so that it is written again; what is left is every one of
        `mine` without an ok marker."""
        markers = self.markers()
        names = [t.name for t in mine]
        forgotten = forget_unmatched(self.out, markers, names, full, self.files)
        todo = [t for t in mine if markers.get(t.name, {}).get("status") != "ok"]
        return Plan(todo, forgotten, markers)

    def set_aside(
        self, plan: Plan[Any], everyone: Iterable[str], live: Callable[[str], bool]
    ) -> list[str]:
        """Move parts with no marker that are none of `everyone` (so no rerun would redo them)
        to orphaned/, unless `live(name)` says a run is writing one; returns the names moved."""
        return set_aside_strays(self.out, plan.markers, set(everyone), live)

    def open(
        self, meta: Mapping[str, Any], agrees: Callable[[Mapping[str, Any]], None] | None = None
    ) -> None:
        """Make parts/ and done/, delete the temp files writers on this host left when they
        died, and create meta.json, or check the one there (a concurrent task's) against
        `meta`. `agrees(meta)`, a check of the caller's own, runs before and after."""
        if agrees is not None:
            agrees(meta)
        for sub in (PARTS_DIR, DONE_DIR):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out / sub)
        create_meta(self.out, meta)
        if agrees is not None:
            agrees(meta)  # a concurrent task may have created it first
        if self.mirror is not None:
            self.mirror.push(META_NAME)

    def write_part(self, name: str, table: pa.Table) -> dict[str, Any]:
        """Write part `name` atomically, page checksums on; returns what its marker records of
        it: part_bytes and part_sha256."""
        return write_part(self.out / PARTS_DIR / f"{name}.parquet", table)

    def mark(self, name: str, marker: Mapping[str, Any]) -> None:
        """Write the completion marker of `name`, after its part: the part is whole by now. With
        a mirror, the part (when the marker records one) then the marker go up, in that order."""
        write_json_atomic(self.out / DONE_DIR / f"{name}.json", marker)
        if self.mirror is not None:
            if marker.get("part_bytes") is not None:
                self.mirror.push(f"{PARTS_DIR}/{name}.parquet")
            self.mirror.push(f"{DONE_DIR}/{name}.json")
