"""fsspec locations (s3://, gs://, https://, ...): reads that survive transient errors.

A remote read that fails mid-shard is resumed where it stopped: the file is reopened and read
from the same offset after a backoff, so a dropped connection costs a retry, not the shard.
Errors that will not go away (no such object, no permission) are not retried. A remote call
that is refused, or still fails after the retries, raises RemoteError: one line for the user.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

from jestcurate.errors import NO_SPACE, JCError, first_line
from jestcurate.io.integrity import PartFiles
from jestcurate.io.schema import DONE_DIR, META_NAME, PARTS_DIR

log = logging.getLogger(__name__)

RETRIES = 5
BACKOFF = 0.5  # seconds, doubled on each retry
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# Client libraries under fsspec raise their own types for network trouble.
_CLIENT_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "google")
# ... and for a setup that no retry fixes (botocore's names).
_CONFIGURATION_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "ParamValidationError"}
)


class RemoteError(JCError, OSError):
    """A remote call that failed for good: refused (no permission, bad credentials), or still
    failing after the retries. A JCError, so the CLI says it in one line; an OSError, so code
    that handles I/O errors (a shard that cannot be read fails alone) goes on handling it."""


def is_url(path: str) -> bool:
    """A location fsspec opens (s3://, gs://, http://, ...), as against a local path."""
    return "://" in path and not path.startswith("file://")


def listed_afresh(url: str) -> tuple[Any, str]:
    """fsspec's (filesystem, path) for `url`, its cached listings dropped: s3fs keeps a
    client's directory listings for the life of the process, so a command run after another
    in one process (a notebook, a scheduler, the tests) would see the store as it was."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs, path


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network and server trouble, not a missing or forbidden object."""
    if isinstance(exc, (*_PERMANENT, RemoteError)):  # a RemoteError was retried already
        return False
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:  # a full local disk stays full
        return False
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    if type(exc).__name__ in _CONFIGURATION_ERRORS:  # no retry fixes missing credentials
        return False
    return type(exc).__module__.split(".", 1)[0] in _CLIENT_MODULES


def retry(
    what: str,
    call: Any,
    retries: int = RETRIES,
    backoff: float = BACKOFF,
    before_retry: Any = None,
) -> Any:
    """call() with up to `retries` retries on transient errors, backing off exponentially;
    `before_retry()`, if given, runs after each wait (to reopen a broken connection). A refusal,
    or a transient error that outlasts the retries, raises RemoteError naming `what`."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if isinstance(exc, PermissionError) and not isinstance(exc, RemoteError):
                raise RemoteError(
                    f"{what}: permission denied ({first_line(exc)}); check the credentials "
                    "and what they may access"
                ) from exc
            if not is_transient(exc):
                raise
            if attempt == retries:
                raise RemoteError(
                    f"{what}: {type(exc).__name__}: {first_line(exc)} (still failing after "
                    f"{retries} retries)"
                ) from exc
            wait = backoff * 2**attempt
            log.warning("%s: %s: %s; retrying in %.1f s", what, type(exc).__name__, exc, wait)
            time.sleep(wait)
            if before_retry is not None:
                before_retry()
    raise AssertionError("unreachable")


class RetryingReader(io.RawIOBase):
    """A read-only stream over an fsspec URL that reopens and seeks on transient errors."""

    def __init__(self, url: str, retries: int = RETRIES, backoff: float = BACKOFF) -> None:
        import fsspec

        self.url = url
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.retries = retries
        self.backoff = backoff
        self.pos = 0
        self._file: Any = None
        self._reopen()

    def _reopen(self) -> None:
        if self._file is not None:
            # The connection is already broken; a read-only file has nothing to flush.
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None

        def open_at() -> Any:
            f = self.fs.open(self.path, "rb")
            if self.pos:
                f.seek(self.pos)
            return f

        self._file = retry(f"opening {self.url}", open_at, self.retries, self.backoff)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = retry(
            f"reading {self.url} at byte {self.pos}",
            lambda: self._file.read(len(view)),
            self.retries,
            self.backoff,
            before_retry=self._reopen,  # resume at self.pos on a fresh connection
        )
        n = len(data)
        view[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def cache_root() -> Path:
    """Where remote score sets are mirrored: $JESTCURATE_CACHE, else ~/.cache/jestcurate."""
    return Path(os.environ.get("JESTCURATE_CACHE") or Path.home() / ".cache" / "jestcurate")


class Mirror:
    """A local copy of a remote score-set folder. `pull` brings down what is missing or has
    changed size; `push` uploads a local file (objects appear whole, so a reader never sees
    a partial one; the marker goes after its part, as locally). Every remote call retries."""

    def __init__(self, url: str, local: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = listed_afresh(self.url)
        digest = hashlib.sha1(self.url.encode()).hexdigest()[:16]
        self.local = local or cache_root() / "mirrors" / digest
        self.local.mkdir(parents=True, exist_ok=True)
        # A bucket store (s3fs, gcsfs, adlfs) has no folders: the first part of a path is its
        # bucket, which s3fs's makedirs would create, from a typo, in the default region.
        split = getattr(self.fs, "split_path", None)
        self.bucket: str | None = split(self.root)[0] if callable(split) else None

    def require_bucket(self) -> None:
        """Before writing: the bucket must be there (writing never creates one)."""
        if self.bucket is None:
            return
        try:
            retry(f"looking up the bucket of {self.url}", lambda: self.fs.info(self.bucket))
        except FileNotFoundError:
            raise JCError(
                f"no bucket {self.bucket!r} for {self.url}: create it first (or check the name)"
            ) from None
        except PermissionError:
            # Credentials scoped to a prefix may write there without the right to look the
            # bucket up (S3's HeadBucket, GCS's buckets.get): the writes will tell.
            log.debug("cannot look up bucket %s; going on", self.bucket)

    def _remote(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def pull(self, patterns: tuple[str, ...]) -> int:
        """Download remote files matching `patterns` (relative globs); returns how many."""
        fetched = 0
        for pattern in patterns:
            found = retry(
                f"listing {self.url}/{pattern}",
                lambda p=pattern: self.fs.glob(self._remote(p), detail=True),
            )
            for path, info in sorted(found.items()):
                if info.get("type") == "directory":
                    continue
                relative = path[len(self.root.rstrip("/")) + 1 :]
                target = self.local / relative
                size = info.get("size")
                if target.is_file() and size is not None and target.stat().st_size == size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.download")
                try:
                    retry(f"downloading {path}", lambda p=path, t=tmp: self.fs.get_file(p, str(t)))
                    os.replace(tmp, target)
                finally:  # never leave half a download behind (a full disk, a signal)
                    tmp.unlink(missing_ok=True)
                fetched += 1
        return fetched

    def sync_markers(self, directory: str = "done") -> None:
        """Make the local completion markers exactly the remote ones: a marker whose upload
        failed must not make a rerun skip its shard."""
        self.pull((f"{directory}/*.json",))
        remote = {
            p.rsplit("/", 1)[-1]
            for p in retry(
                f"listing {self.url}/{directory}",
                lambda: self.fs.glob(self._remote(f"{directory}/*.json")),
            )
        }
        for path in (self.local / directory).glob("*.json"):
            if path.name not in remote:
                path.unlink()

    def sizes(self, directory: str, suffix: str) -> dict[str, int]:
        """{name without `suffix`: byte size} of the remote files directory/*suffix, from one
        listing."""
        found = retry(
            f"listing {self.url}/{directory}",
            lambda: self.fs.glob(self._remote(f"{directory}/*{suffix}"), detail=True),
        )
        return {
            path.rsplit("/", 1)[-1].removesuffix(suffix): int(info["size"])
            for path, info in found.items()
            if info.get("type") != "directory"
        }

    def sha256(self, relative: str) -> str:
        """The sha256 of a remote file, streamed (nothing is stored locally)."""
        with RetryingReader(f"{self.url}/{relative}") as raw:
            return hashlib.file_digest(io.BufferedReader(raw, 1 << 20), "sha256").hexdigest()

    def push(self, relative: str) -> None:
        source = self.local / relative
        target = self._remote(relative)
        parent = target.rsplit("/", 1)[0]
        if self.bucket is None:  # a bucket store has no folders to make
            retry(f"creating {parent}", lambda: self.fs.makedirs(parent, exist_ok=True))
        retry(f"uploading {target}", lambda: self.fs.put_file(str(source), target))


def score_out(out: str) -> tuple[Path, str | None]:
    """(local folder, the URL it mirrors or None) for score's --out."""
    if is_url(out):
        return Mirror(out).local, out
    return Path(out.removeprefix("file://")), None


def local_dir(location: str, patterns: tuple[str, ...] = ("**",)) -> Path:
    """A score set or output folder given as a path or a URL, as a local folder: a URL is
    mirrored (the files matching `patterns`) and the mirror returned."""
    if not is_url(location):
        return Path(location[len("file://") :] if location.startswith("file://") else location)
    mirror = Mirror(location)
    mirror.pull(patterns)
    if not (mirror.local / META_NAME).is_file():
        raise JCError(f"{location} is not a score set (no {META_NAME} there)")
    return mirror.local


class RemoteParts(PartFiles):
    """The parts of a score set at a URL, for the checks: names and sizes from one listing,
    hashes streamed from the remote copy. Claims are looked up in the local mirror."""

    local = False

    def __init__(self, mirror: Mirror) -> None:
        super().__init__(mirror.local)
        self.mirror = mirror
        self._sizes = mirror.sizes(PARTS_DIR, ".parquet")

    def names(self) -> set[str]:
        return set(self._sizes)

    def size(self, name: str) -> int | None:
        return self._sizes.get(name)

    def sha256(self, name: str) -> str:
        return self.mirror.sha256(f"{PARTS_DIR}/{name}.parquet")


def remote_score_set(url: str) -> tuple[Path, RemoteParts]:
    """A score set at a URL for checking: its local mirror with meta.json and exactly the
    remote markers, and its parts as they are remotely."""
    mirror = Mirror(url)
    mirror.pull((META_NAME,))
    mirror.sync_markers(DONE_DIR)
    if not (mirror.local / META_NAME).is_file() and not any(mirror.local.glob(f"{DONE_DIR}/*")):
        raise JCError(f"{url} is not a score set (no {META_NAME}, no markers there)")
    return mirror.local, RemoteParts(mirror)
