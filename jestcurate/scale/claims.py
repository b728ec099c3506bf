"""Per-shard claims, so that runs sharing a score set (an overlapping cron run, a rerun next to
a still-running job) never score the same shard at once.

A claim is DIR/claims/NAME.json: the owner's host, pid (the main process), the pid's start
time, a token unique to the run, and a lease expiry that a heartbeat thread renews. A claim is
stale, and is taken over, when
* its owner ran on this host and that process is gone (so a rerun right after `kill -9` goes on
  at once), or
* it ran on another host and its lease has run out (a host cannot see another's processes), or
* it was made by an earlier incarnation of this same Slurm job (requeued after a node failure).
Every change to a claim happens under an exclusive flock on DIR/claims/claims.lock (NFS clients
map it to a POSIX lock), so checking a claim and replacing it cannot interleave with another
run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CLAIMS_DIR = "claims"
DEFAULT_LEASE = 600.0


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a live process
    from a later one that got the same pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    return started is None or _process_start(pid) in (None, started)


def _slurm_job() -> str | None:
    """This Slurm job (array task) across requeues: Slurm never runs two incarnations at once.
    The tasks `jestcurate local` runs inside one Slurm job are told apart by their task."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        job: str | None = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env.get("SLURM_JOB_ID")
    local = env.get("JESTCURATE_LOCAL_TASK")  # pipelines/local.py's TASK_VARIABLE
    return f"{job}.local-{local}" if job and local else job


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    pid_start: str | None
    token: str
    job: str | None = None

    @classmethod
    def this_process(cls) -> Owner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _process_start(pid), uuid.uuid4().hex, _slurm_job())

    def describe(self) -> str:
        return f"{self.host}:{self.pid}"


class Claims:
    """The claims of one score set, as seen by one run (`owner`). Picklable, so DataLoader
    workers claim shards on their main process's behalf."""

    def __init__(self, out: Path, owner: Owner, lease: float = DEFAULT_LEASE) -> None:
        self.dir = out / CLAIMS_DIR
        self.owner = owner
        self.lease = lease
        self.dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.dir / "claims.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: written by something else; treated as stale

    def _write(self, name: str) -> None:
        claim = {**asdict(self.owner), "claimed": time.time(), "expires": time.time() + self.lease}
        tmp = self.dir / f".{name}.{self.owner.token}.tmp"
        tmp.write_text(json.dumps(claim), encoding="utf-8")
        os.replace(tmp, self._path(name))

    def is_ours(self, claim: dict[str, Any] | None) -> bool:
        return bool(claim) and claim.get("token") == self.owner.token  # type: ignore[union-attr]

    def is_stale(self, claim: dict[str, Any]) -> bool:
        if not claim:
            return True
        if claim.get("job") and claim.get("job") == self.owner.job:
            return True  # an earlier incarnation of this requeued Slurm job
        if claim.get("host") == self.owner.host:
            return not _alive(int(claim.get("pid", -1)), claim.get("pid_start"))
        return float(claim.get("expires", 0)) < time.time()

    def held_by_other(self, name: str) -> dict[str, Any] | None:
        """The live claim of another run on `name`, if there is one."""
        claim = self.read(name)
        if claim is None or self.is_ours(claim) or self.is_stale(claim):
            return None
        return claim

    def try_claim(self, name: str) -> bool:
        """Claim `name` unless another run holds a live claim on it."""
        with self._locked():
            claim = self.read(name)
            if claim is not None and not self.is_ours(claim):
                if not self.is_stale(claim):
                    return False
                log.warning(
                    "taking over shard %s from %s:%s, which %s",
                    name,
                    claim.get("host", "?"),
                    claim.get("pid", "?"),
                    "is gone" if claim.get("host") == self.owner.host else "let its lease expire",
                )
            self._write(name)
            return True

    def release(self, name: str) -> None:
        with self._locked():
            if self.is_ours(self.read(name)):
                with contextlib.suppress(FileNotFoundError):
                    self._path(name).unlink()

    def ours(self) -> list[str]:
        return [p.stem for p in self.dir.glob("*.json") if self.is_ours(self.read(p.stem))]

    def renew(self) -> None:
        with self._locked():
            for name in self.ours():
                self._write(name)

    def release_all(self) -> None:
        for name in self.ours():
            self.release(name)

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew this run's claims every quarter lease while the block runs; release whatever
        is still held when it ends, however it ends."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease / 4):
                try:
                    self.renew()
                except OSError as exc:  # a flaky mount must not kill the run; the next beat retries
                    log.warning("could not renew shard claims: %s", exc)

        thread = threading.Thread(target=beat, name="jestcurate-claims", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release_all()
