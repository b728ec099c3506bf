"""score's plan: the config, its checks, and which shards this task scores."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from jestcurate.errors import JCError
from jestcurate.io.reader import DEFAULT_MAX_PIXELS
from jestcurate.io.remote import Mirror
from jestcurate.io.shards import Shard, expand_inputs, probe
from jestcurate.io.store import (
    DONE_DIR,
    META_NAME,
    ORPHANED_DIR,
)
from jestcurate.io.writer import ScoreSetWriter
from jestcurate.model.devicedecode import DECODERS
from jestcurate.scale.claims import DEFAULT_LEASE, Claims, Owner
from jestcurate.scale.tasks import for_task, resolve_task

log = logging.getLogger(__name__)

ROLES = ("reference", "learner")


@dataclass(frozen=True)
class ScoreConfig:
    inputs: tuple[str, ...]
    out: Path
    model: str
    pretrained: str | None = None
    batch_size: int | None = None  # None: DEFAULT_BATCH for the device
    device: str = "auto"
    precision: str | None = None
    workers: int | None = None
    task_index: int | None = None
    num_tasks: int | None = None
    role: str = "reference"
    verify: bool = False  # rerun: check every finished part's sha256, not only its size
    max_pixels: int = DEFAULT_MAX_PIXELS
    init_seed: int = 0
    lease: float = DEFAULT_LEASE  # seconds a claim lasts unrenewed (matters across hosts)
    upload_to: str | None = None  # an fsspec URL: `out` is then its local mirror
    decode: str = "auto"  # pil, pil-draft or torch; "auto": torch where the transform allows
    poll: float = 10.0  # seconds between looks at shards that other runs are scoring


@dataclass(frozen=True)
class Plan:
    mine: list[Shard]  # this task's shards
    todo: list[Shard]  # those of them without an ok marker
    task_index: int
    num_tasks: int


def open_mirror(cfg: ScoreConfig) -> Mirror | None:
    """For a remote OUT (--out URL): its local mirror, holding its meta.json and markers."""
    if cfg.upload_to is None:
        return None
    mirror = Mirror(cfg.upload_to, local=cfg.out)
    mirror.require_bucket()
    mirror.pull((META_NAME,))
    mirror.sync_markers(DONE_DIR)
    return mirror


def plan_shards(cfg: ScoreConfig, writer: ScoreSetWriter) -> Plan:
    """This task's shards and those still to do; parts that no longer match their markers are
    forgotten, and parts of no input shard set aside."""
    urls = expand_inputs(cfg.inputs)
    index, count = resolve_task(cfg.task_index, cfg.num_tasks)
    everyone = writer.names(urls)
    mine = for_task(everyone, index, count)
    found = writer.plan(mine, cfg.verify)  # a part that no longer matches its marker is not done
    if found.todo:
        probe(found.todo[0].url)
    urls_of = {s.name: s.url for s in mine}
    for name, problem in found.forgotten:
        log.warning("part %s is %s: scoring %s again", name, problem, urls_of[name])
    if writer.mirror is None:  # a part no input shard would redo, and no run is writing
        owner = Owner.this_process()

        def live(name: str) -> bool:  # only asked when there are strays: no claims/ otherwise
            return Claims(cfg.out, owner).held_by_other(name) is not None

        for name in writer.set_aside(found, (s.name for s in everyone), live):
            log.warning(
                "part %s has no marker and is none of the INPUTS' shards: moved to %s/%s/",
                name, cfg.out, ORPHANED_DIR,
            )  # fmt: skip
    return Plan(mine, found.todo, index, count)


def validate(cfg: ScoreConfig) -> None:
    if cfg.role not in ROLES:
        raise JCError(f"unknown role {cfg.role!r}; use reference or learner")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise JCError("--batch-size must be at least 1")
    if cfg.decode not in DECODERS:
        raise JCError(f"--decode must be one of {', '.join(DECODERS)}, not {cfg.decode!r}")
    if cfg.workers is not None and cfg.workers < 0:
        raise JCError("--workers must be 0 or more")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise JCError(f"--out {cfg.out} exists and is not a directory")
