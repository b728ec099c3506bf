"""Files written whole or not at all, and read back: atomic writes (a temp file named by host
and pid, fsynced, renamed over the target), JSON objects, the temp files of writers that died,
and a file's size and sha256."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jestcurate.errors import NO_SPACE, JCError, no_space

_TMP_SUFFIX = ".tmp"


def tmp_name(path: Path) -> Path:
    # Host and pid in the name let a later run tell a dead writer's leftovers from a live one's.
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{_TMP_SUFFIX}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` then rename over `path`: readers see the old file or the whole
    new one, never a partial one, whatever kills the process."""
    tmp = tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space(exc, path) from None
        raise
    except Exception as exc:  # torch.save and others say "write failed", not ENOSPC
        if _nearly_full(path.parent):
            raise no_space(OSError(errno.ENOSPC, str(exc)), path) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def write_json_atomic(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def read_existing_json(path: Path) -> dict[str, Any] | None:
    """A JSON record an earlier run wrote (meta.json, a summary): None where there is none
    yet, a one-line refusal where it cannot be read."""
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise JCError(f"{path} is unreadable ({exc}); remove it or use another --out") from None


def file_digest(path: Path) -> dict[str, Any]:
    """A file's byte size and sha256: what summaries record of their outputs."""
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": sha}


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files left by writers on this host that no longer run (killed mid-write)."""
    host = socket.gethostname()
    removed = 0
    for tmp in directory.glob(f".*{_TMP_SUFFIX}"):
        parts = tmp.name[: -len(_TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit():
            continue
        if not _pid_alive(int(parts[2])):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


def dead_local_writer(host: str, pid: int) -> bool:
    """Whether a writer named by host and pid is gone: only knowable for this host."""
    return host == socket.gethostname() and not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
