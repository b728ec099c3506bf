"""Remote storage through fsspec where the real S3 server (tests/test_s3.py) cannot stand in:
connections dropped at an exact byte (an in-memory filesystem that breaks reads on cue)."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from fsspec.implementations.memory import MemoryFileSystem

from jestcurate.io.remote import RemoteError, RetryingReader, is_transient


class FlakyFS(MemoryFileSystem):
    """In-memory files whose reads break (ConnectionError) after `every` bytes of an open
    file, `failures` times in all: a connection that drops mid-transfer."""

    protocol = "flaky"
    store: dict = {}  # noqa: RUF012 (fsspec's layout)
    pseudo_dirs = [""]  # noqa: RUF012
    failures = 0
    every = 4096
    opens = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if mode == "rb":
            FlakyFS.opens += 1
            return _Flaky(f)
        return f


class _Flaky(io.RawIOBase):
    def __init__(self, f) -> None:
        self.f = f
        self.served = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if FlakyFS.failures > 0 and self.served >= FlakyFS.every:
            FlakyFS.failures -= 1
            raise ConnectionError("connection reset by peer (injected)")
        n = FlakyFS.every if n is None or n < 0 else min(n, FlakyFS.every)
        data = self.f.read(n)
        self.served += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)


@pytest.fixture
def flaky() -> type[FlakyFS]:
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    FlakyFS.store.clear()
    FlakyFS.failures, FlakyFS.opens = 0, 0
    return FlakyFS


def test_retrying_reader_resumes_after_dropped_connections(flaky) -> None:
    payload = bytes(range(256)) * 200  # 51,200 bytes
    flaky().pipe("/bucket/blob", payload)
    flaky.failures = 3
    with RetryingReader("flaky://bucket/blob", backoff=0.001) as f:
        data = f.read()
    assert data == payload and flaky.failures == 0 and flaky.opens == 4
    flaky.failures, flaky.every = 100, 0  # every read fails at once: no progress
    # A connection that never recovers still fails, in one line naming where.
    with pytest.raises(RemoteError, match=r"bucket/blob at byte 0: .* after 2 retries") as failed:
        RetryingReader("flaky://bucket/blob", retries=2, backoff=0.001).read()
    assert isinstance(failed.value.__cause__, ConnectionError)
    with pytest.raises(FileNotFoundError):
        RetryingReader("flaky://bucket/missing", backoff=0.001)
    assert not is_transient(FileNotFoundError()) and is_transient(TimeoutError())
    flaky.every = 4096


def test_score_survives_flaky_remote_shards(corpus: Path, tmp_path: Path, flaky) -> None:
    fs = flaky()
    for tar in sorted(corpus.glob("*.tar")):
        fs.pipe(f"/pool/{tar.name}", tar.read_bytes())
    flaky.failures, flaky.every = 6, 20_000
    code, output = run_cli(
        "score", "flaky://pool/", "--out", tmp_path / "s", "-m", "jc-tiny", "--workers", "0"
    )
    assert code == 0, output
    assert flaky.failures == 0  # every injected failure happened and was survived
    code, _ = run_cli("score", corpus, "--out", tmp_path / "local", "-m", "jc-tiny")
    for part in sorted((tmp_path / "local" / "parts").glob("*.parquet")):
        remote = pq.read_table(tmp_path / "s" / "parts" / part.name)
        local = pq.read_table(part)
        assert remote.drop(["shard"]).equals(local.drop(["shard"])), part.name
