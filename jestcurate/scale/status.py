"""Where a score set stands, from its files alone (`jestcurate status` shows it through
pipelines/status.py).

Done and failed shards come from the completion markers, shards being scored now from live
claims, and, given the INPUTS, pending shards are those with no marker yet. The same view
drives `slurm score --retry` and `jestcurate local`, which run only the array tasks that still
have work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jestcurate.errors import JCError
from jestcurate.io.integrity import PartFiles, part_problem, read_markers
from jestcurate.io.schema import DONE_DIR
from jestcurate.io.shards import Shard, assign_names, expand_inputs
from jestcurate.scale.claims import CLAIMS_DIR, Claims, Owner


@dataclass
class ScoreStatus:
    out: Path
    done: list[str] = field(default_factory=list)  # shard urls
    failed: list[tuple[str, str]] = field(default_factory=list)  # (shard, error)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (shard or part, problem)
    running: list[tuple[str, str]] = field(default_factory=list)  # (shard, "host:pid")
    pending: list[str] | None = None  # shards of INPUTS with no marker; None without INPUTS
    outside: int = 0  # markers of shards that are not among the INPUTS

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "score set",
            "out": str(self.out),
            "done": len(self.done),
            "failed": [{"shard": s, "error": e} for s, e in self.failed],
            "damaged": [{"shard": s, "problem": p} for s, p in self.damaged],
            "running": [{"shard": s, "owner": o} for s, o in self.running],
            "pending": self.pending,
            "outside_inputs": self.outside,
        }

    @property
    def complete(self) -> bool:
        return not self.failed and not self.damaged and not self.running and not self.pending


def named_shards(urls: Sequence[str], markers: dict[str, dict[str, Any]]) -> list[Shard]:
    """The shards under the names score gives them, given the names its markers hold."""
    owners = {name: m.get("shard") for name, m in markers.items()}
    return assign_names(urls, owners)


def score_status(
    out: Path, inputs: Sequence[str] = (), full: bool = False, files: PartFiles | None = None
) -> ScoreStatus:
    """Where a score set stands; `full` also compares each part's sha256 with its marker.
    `files` says where the parts are when not under `out` (remote.RemoteParts for a URL,
    whose local mirror holds the markers only)."""
    if not (out / "meta.json").is_file() and not (out / DONE_DIR).is_dir():
        raise JCError(
            f"{out} is not a score set, a selection or an export (no meta.json, no shards/)"
        )
    markers = read_markers(out)
    files = files or PartFiles(out)
    status = ScoreStatus(out)
    claims = Claims(out, Owner.this_process()) if (out / CLAIMS_DIR).is_dir() else None
    wanted = named_shards(expand_inputs(inputs), markers) if inputs else None
    names = {s.name for s in wanted} if wanted is not None else set(markers)
    for name in sorted(markers):
        marker = markers[name]
        if name not in names:
            status.outside += 1
            continue
        shard = str(marker.get("shard", name))
        problem = part_problem(files, name, marker, full)
        if problem:
            status.damaged.append((shard, problem))
        elif marker.get("status") == "ok":
            status.done.append(shard)
        else:
            status.failed.append((shard, str(marker.get("error"))))
    for name in sorted(files.names() - set(markers)):
        if wanted is None or name in names:
            status.damaged.append((name, str(part_problem(files, name, None))))
    if not (out / "meta.json").is_file():
        status.damaged.append(("meta.json", "missing (a score rerun writes it again)"))
    by_name = {s.name: s.url for s in wanted or []}
    if claims is not None:
        for path in sorted(claims.dir.glob("*.json")):
            claim = claims.held_by_other(path.stem)
            if claim is not None and (wanted is None or path.stem in by_name):
                owner = f"{claim.get('host')}:{claim.get('pid')}"
                status.running.append((by_name.get(path.stem, path.stem), owner))
    if wanted is not None:
        busy = {s for s, _ in status.running}
        status.pending = [s.url for s in wanted if s.name not in markers and s.url not in busy]
    return status


def done_shard(files: PartFiles, name: str, marker: dict[str, Any] | None) -> bool:
    """An ok marker whose part still matches it."""
    if marker is None or marker.get("status") != "ok":
        return False
    return part_problem(files, name, marker) is None
