"""Which shards a run reads: expanding inputs, naming shards, splitting them between tasks."""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import IO

from braceexpand import braceexpand

from jestcurate.errors import JCError, first_line
from jestcurate.io.remote import RetryingReader, is_url, listed_afresh, retry

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Shard:
    """One input tar: `url` is the resolved location (absolute path or URL), `name` the file stem
    used for its part and marker."""

    url: str
    name: str


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _check_protocol(url: str) -> None:
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise JCError(f"cannot read {protocol}:// inputs: {first_line(exc)}") from None


def _is_shard_file(name: str) -> bool:
    return name.endswith(SHARD_SUFFIXES)


def _expand_url(url: str) -> Iterator[str]:
    import fsspec

    _check_protocol(url)
    listed_afresh(url)
    if _GLOB_CHARS.search(url.split("://", 1)[1]):
        fs, _, paths = retry(f"listing {url}", lambda: fsspec.get_fs_token_paths(url))
        found = sorted(p for p in paths if _is_shard_file(p))
        if not found:
            raise JCError(f"no shards match {url}")
        yield from (fs.unstrip_protocol(p) for p in found)
    elif url.endswith("/") or not _is_shard_file(url):
        # A remote folder: list its tars the way a local directory is listed.
        fs, path = fsspec.core.url_to_fs(url)
        try:
            entries = retry(f"listing {url}", lambda: fs.ls(path.rstrip("/"), detail=False))
        except FileNotFoundError:
            raise JCError(f"input not found: {url}") from None
        found = sorted(p for p in entries if _is_shard_file(p))
        if not found:
            raise JCError(f"no .tar files in {url}")
        yield from (fs.unstrip_protocol(p) for p in found)
    else:
        yield url


def _expand_local(path: str, missing: list[str]) -> Iterator[str]:
    path = os.path.expanduser(_local(path))
    if _GLOB_CHARS.search(path):
        found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not found:
            missing.append(path)
        yield from (os.path.abspath(p) for p in found)
    elif os.path.isdir(path):
        # img2dataset folders also hold .parquet and _stats.json sidecars: only tars are shards.
        found = sorted(e.path for e in os.scandir(path) if e.is_file() and _is_shard_file(e.name))
        if not found:
            raise JCError(f"no .tar files in directory {path}")
        yield from (os.path.abspath(p) for p in found)
    elif os.path.isfile(path):
        yield os.path.abspath(path)
    else:
        missing.append(path)


def _read_list_file(ref: str) -> list[str]:
    import fsspec

    location = ref[1:]
    try:
        if is_url(location):
            _check_protocol(location)
            with fsspec.open(location, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            with open(_local(location), encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        raise JCError(f"shard list not found: {location}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JCError(f"cannot read shard list {location}: {exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Turn the user's INPUTS into an ordered, de-duplicated list of shard locations.

    Accepts tar paths, directories of tars, brace patterns, globs, fsspec URLs and `@list.txt`
    files. Order is the order given (directories and globs sorted), so every task of an array job
    computes the same list.
    """
    missing: list[str] = []
    out: list[str] = []

    def expand(item: str, depth: int) -> None:
        if item.startswith("@"):
            if depth > 4:
                raise JCError(f"shard lists nested too deeply at {item}")
            for line in _read_list_file(item):
                expand(line, depth + 1)
            return
        for pattern in braceexpand(item):
            out.extend(_expand_url(pattern) if is_url(pattern) else _expand_local(pattern, missing))

    for item in inputs:
        expand(item, 0)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise JCError(f"input not found: {missing[0]}{more}")
    unique = list(dict.fromkeys(out))
    if not unique:
        raise JCError("no input shards given")
    return unique


def shard_stem(url: str) -> str:
    base = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in SHARD_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return _UNSAFE_NAME_CHARS.sub("_", base) or "shard"


def _path_hash(url: str) -> str:
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:8]


def assign_names(urls: Sequence[str], owners: Mapping[str, str] | None = None) -> list[Shard]:
    """Name each shard by its stem; stems shared by two inputs get a short hash of the full path.

    `owners` maps names already used in the output (from completion markers) to the shard that
    used them, so a shard keeps its name across runs even if a later run adds a same-stem input.
    """
    owners = owners or {}
    stems = [shard_stem(u) for u in urls]
    counts = Counter(stems)
    shards = []
    for url, stem in zip(urls, stems, strict=True):
        owner = owners.get(stem)
        if owner == url or (owner is None and counts[stem] == 1):
            name = stem
        else:
            name = f"{stem}-{_path_hash(url)}"
        shards.append(Shard(url=url, name=name))
    return shards


def shard_size(url: str) -> int | None:
    try:
        if is_url(url):
            import fsspec

            fs, path = fsspec.core.url_to_fs(url)
            return int(retry(f"sizing {url}", lambda: fs.size(path)))
        return os.path.getsize(_local(url))
    except (OSError, ValueError, TypeError):
        return None


def probe(url: str) -> None:
    """One request for a remote shard before a run reads it: a refusal (bad credentials) or a
    store that does not answer after the retries raises RemoteError, one line for the user,
    rather than a failed marker for every shard. A missing shard is left to fail alone."""
    if not is_url(url):
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    with suppress(FileNotFoundError):
        retry(f"looking up {url}", lambda: fs.info(path))


@contextmanager
def open_shard(url: str) -> Iterator[IO[bytes]]:
    if is_url(url):
        with io.BufferedReader(RetryingReader(url), buffer_size=1 << 20) as f:
            yield f
    else:
        with open(_local(url), "rb", buffering=1 << 20) as f:
            yield f
