"""Remote storage through fsspec: reads that survive dropped connections, and score sets
written to and read from URLs (an in-memory filesystem standing in for s3:// or gs://)."""

from __future__ import annotations

import io
import json
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


@pytest.fixture
def memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MemoryFileSystem:
    monkeypatch.setenv("JESTCURATE_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
    return fs


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


def test_score_set_on_a_url_written_resumed_and_read(
    corpus: Path, tmp_path: Path, memory, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "memory://bucket/scores"
    args = ["score", corpus, "--out", url, "-m", "jc-tiny", "--workers", "0"]
    code, output = run_cli(*args)
    assert code == 0, output
    names = sorted(p.removeprefix("/bucket/scores/") for p in memory.find("/bucket/scores"))
    assert names == [
        "done/00000.json", "done/00001.json", "done/00002.json", "meta.json",
        "parts/00000.parquet", "parts/00001.parquet", "parts/00002.parquet",
    ]  # fmt: skip
    assert json.loads(memory.cat("/bucket/scores/meta.json"))["model"] == "jc-tiny"

    code, output = run_cli(*args)
    assert code == 0 and "scored now" in output and " 0 " in output.split("scored now")[1][:20]
    # A shard lost remotely is scored again, even though the local mirror still has it.
    memory.rm("/bucket/scores/done/00001.json")
    memory.rm("/bucket/scores/parts/00001.parquet")
    code, output = run_cli(*args)
    assert code == 0 and memory.exists("/bucket/scores/done/00001.json"), output
    assert "already done (skipped)" in output

    # Readers take the URL: status, info, select.
    code, output = run_cli("status", url, corpus, "--check")
    assert code == 0, output
    code, output = run_cli("info", url)
    assert code == 0 and "jc-tiny" in output, output
    code, output = run_cli("select", url, "--out", tmp_path / "sel", "-b", "8", "--ratio", "0.5")
    assert code == 0, output
    assert pq.read_table(tmp_path / "sel" / "manifest.parquet").num_rows > 0

    # On a new host (an empty local mirror: markers first, no parts) nothing looks damaged,
    # and a rerun scores nothing again.
    monkeypatch.setenv("JESTCURATE_CACHE", str(tmp_path / "other-host"))
    code, output = run_cli("status", url, corpus, "--check")
    assert code == 0, output
    code, output = run_cli(*args)
    assert code == 0 and " 0 " in output.split("scored now")[1][:20], output
