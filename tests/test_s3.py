"""Remote storage on a real S3 API: moto's server on 127.0.0.1 (tests/s3server.py, started by
conftest's s3_server fixture) with s3fs as the client. Score reads shards from s3:// and
writes its score set there; select, export, verify and status read it; the server stops in
the middle of a run; a missing bucket and bad credentials say one line. Without moto or s3fs
these tests skip, saying why; under CI=true they fail instead."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import S3, run_cli, run_subprocess

pytestmark = pytest.mark.slow
TINY = ["-m", "jc-tiny", "--workers", "0"]


def corpus_keys(folder: Path) -> set[str]:
    return {
        name.split(".", 1)[0]
        for tar in folder.glob("*.tar")
        for name in tarfile.open(tar).getnames()
    }


def remote_rows(s3: S3, scores: str) -> pa.Table:
    """Every row of the parts of s3://BUCKET/SCORES as they are on the server."""
    s3.fs.invalidate_cache()
    parts = sorted(s3.fs.glob(f"{s3.bucket}/{scores}/parts/*.parquet"))
    return pa.concat_tables([pq.read_table(io.BytesIO(s3.fs.cat_file(p))) for p in parts])


def markers(s3: S3, scores: str) -> dict[str, str]:
    """{marker name: its status} of s3://BUCKET/SCORES, as on the server."""
    s3.fs.invalidate_cache()
    found = s3.fs.glob(f"{s3.bucket}/{scores}/done/*.json")
    return {Path(p).stem: json.loads(s3.fs.cat_file(p))["status"] for p in found}


def assert_every_key_once(s3: S3, scores: str, corpus: Path) -> None:
    counts = Counter(remote_rows(s3, scores).column("key").to_pylist())
    assert set(counts) == corpus_keys(corpus)
    assert set(counts.values()) == {1}, [k for k, n in counts.items() if n > 1]
    assert markers(s3, scores) == dict.fromkeys(["00000", "00001", "00002"], "ok")


def test_the_server_keeps_its_objects_across_a_restart(s3: S3) -> None:
    odd = f"{s3.bucket}/a folder/key+with%odd chars.bin"
    s3.fs.pipe_file(odd, b"\x00\x01" * 1000)
    s3.fs.mkdir(f"{s3.bucket}-empty")
    s3.server.restart()
    s3.fresh_clients()
    assert s3.fs.cat_file(odd) == b"\x00\x01" * 1000
    assert s3.fs.exists(f"{s3.bucket}-empty")
    assert s3.fs.find(s3.bucket) == [odd]


def test_score_from_s3_to_s3_and_the_readers_take_it(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, scores = s3.upload(corpus), s3.url("scores")
    code, output = run_cli("score", pool, "--out", scores, *TINY)
    assert code == 0, output
    assert f"score set: {scores}\n" in output  # the URL, not the local mirror
    names = sorted(p.removeprefix(f"{s3.bucket}/scores/") for p in s3.fs.find(scores))
    assert names == [
        "done/00000.json", "done/00001.json", "done/00002.json", "meta.json",
        "parts/00000.parquet", "parts/00001.parquet", "parts/00002.parquet",
    ]  # fmt: skip
    assert_every_key_once(s3, "scores", corpus)

    code, output = run_cli("verify", scores)
    assert code == 0 and f"{scores} (score set): 3 files checked, intact" in output, output
    code, output = run_cli("status", scores, pool, "--check")
    assert code == 0 and output.startswith(f"{scores} (score set)"), output

    sel = tmp_path / "sel"
    code, output = run_cli("select", scores, "--out", sel, "-b", "8", "--ratio", "0.5", "--export")
    assert code == 0, output
    kept = pq.read_table(sel / "manifest.parquet").column("key").to_pylist()
    assert kept and set(kept) <= corpus_keys(corpus)
    # The export read the kept samples' bytes from the shards on the server.
    exported = []
    for tar_path in sorted((sel / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".json"):
                    continue
                source = json.loads(tar.extractfile(member).read())["jestcurate"]
                assert source["source_shard"].startswith(pool), source
                image = tar.extractfile(member.name.replace(".json", ".jpg")).read()
                with tarfile.open(corpus / Path(source["source_shard"]).name) as original:
                    assert image == original.extractfile(f"{source['source_key']}.jpg").read()
                exported.append(source["source_key"])
    assert exported == kept
    assert run_cli("verify", sel)[0] == 0
    assert run_cli("status", sel)[0] == 0

    # Changed on the server by another client (this process's s3fs caches listings): shard
    # 00001 lost, shard 00002's part cut short (the local mirror still has both whole). The
    # checks look at the server, and the rerun scores those two again.
    other = type(s3.fs)(skip_instance_cache=True)
    other.rm([f"{s3.bucket}/scores/done/00001.json", f"{s3.bucket}/scores/parts/00001.parquet"])
    part = f"{s3.bucket}/scores/parts/00002.parquet"
    other.pipe_file(part, other.cat_file(part)[:-100])
    code, output = run_cli("status", scores, pool, "--check")
    assert code == 1 and re.search(r"pending +1 ", output), output
    assert re.search(r"damaged .* +1 ", output), output
    code, output = run_cli("verify", scores)
    assert code == 1 and "00002.parquet" in output, output
    code, output = run_cli("score", pool, "--out", scores, *TINY)
    assert code == 0 and "1 of 3 shards already done" in output, output
    assert run_cli("status", scores, pool, "--check")[0] == 0
    assert run_cli("verify", scores)[0] == 0
    assert_every_key_once(s3, "scores", corpus)

    # On a new host (an empty local mirror: markers first, no parts) nothing looks damaged,
    # and a rerun scores nothing again.
    monkeypatch.setenv("JESTCURATE_CACHE", str(tmp_path / "other-host"))
    code, output = run_cli("status", scores, pool, "--check")
    assert code == 0, output
    code, output = run_cli("score", pool, "--out", scores, *TINY)
    assert code == 0 and "3 of 3 shards already done" in output, output


@contextmanager
def restarting(s3: S3) -> Iterator[list[str]]:
    """While the body runs: once the server has stopped (see S3Server.stop_at), start it again
    at once. Yields a list that gets "restarted" when that happened."""
    done, happened = threading.Event(), []
    server = s3.server

    def watch() -> None:
        while not done.wait(0.05):
            if server.proc.poll() is not None:
                server.wait_stopped()
                server.start()
                happened.append("restarted")
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield happened
    finally:
        done.set()
        watcher.join()


@pytest.mark.parametrize("botocore_retries", ["on", "off"])
def test_score_goes_on_when_the_server_restarts_mid_run(
    s3: S3, corpus: Path, botocore_retries: str
) -> None:
    pool, scores = s3.upload(corpus), s3.url("scores")
    # The server stops when the run asks for the second shard's bytes (the first is scored and
    # uploaded) and is started again at once. botocore's own retries may bridge that; without
    # them (AWS_MAX_ATTEMPTS=1) jestcurate's reopen-and-seek retries must.
    s3.server.stop_at("GET", f"/{s3.bucket}/pool/00001.tar")
    env = {"AWS_MAX_ATTEMPTS": "1"} if botocore_retries == "off" else {}
    with restarting(s3) as happened:
        done = run_subprocess("score", pool, "--out", scores, *TINY, env=env, timeout=300)
    assert happened == ["restarted"], s3.server.tail()
    assert done.returncode == 0, done.stderr
    if botocore_retries == "off":
        assert f"reading s3://{s3.bucket}/pool/00001.tar at byte 0: " in done.stderr
        assert "retrying in" in done.stderr
    s3.fresh_clients()
    assert_every_key_once(s3, "scores", corpus)


def test_a_rerun_resumes_after_the_server_was_down_past_the_retries(s3: S3, corpus: Path) -> None:
    pool, scores = s3.upload(corpus), s3.url("scores")
    # The server stops as the run uploads the second shard's marker (its part is there
    # already) and stays down: the run gives up after its retries, in one line. botocore's own
    # retries are turned off for it, or giving up takes a minute.
    s3.server.stop_at("PUT", f"/{s3.bucket}/scores/done/00001.json")
    failed = run_subprocess("score", pool, "--out", scores, *TINY, env={"AWS_MAX_ATTEMPTS": "1"},
                            timeout=300)  # fmt: skip
    s3.server.wait_stopped()
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 2, failed.stderr
    assert last.startswith(f"error: uploading {s3.bucket}/scores/done/00001.json: "), last
    assert "still failing after 5 retries" in last
    s3.server.start()
    s3.fresh_clients()
    assert s3.fs.exists(f"{s3.bucket}/scores/parts/00001.parquet")  # a part without its marker
    assert markers(s3, "scores") == {"00000": "ok"}
    code, output = run_cli("score", pool, "--out", scores, *TINY)
    assert code == 0 and "1 of 3 shards already done" in output, output
    assert_every_key_once(s3, "scores", corpus)
    assert run_cli("verify", scores)[0] == 0


def one_line_error(code: int, output: str) -> str:
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_a_missing_bucket_or_bad_credentials_say_one_line(
    s3: S3, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, scores = s3.upload(corpus), s3.url("scores")
    assert run_cli("score", pool, "--out", scores, *TINY)[0] == 0
    nowhere = f"s3://{s3.bucket}-missing/scores"
    line = one_line_error(*run_cli("score", pool, "--out", nowhere, *TINY))
    assert f"no bucket '{s3.bucket}-missing'" in line
    assert not s3.fs.exists(f"{s3.bucket}-missing")  # and none was made
    for reader in (["verify", nowhere], ["status", nowhere], ["info", nowhere],
                   ["select", nowhere, "--out", tmp_path / "sel", "-b", "8"]):  # fmt: skip
        assert f"{nowhere} is not a score set" in one_line_error(*run_cli(*reader))
    line = one_line_error(*run_cli("score", f"s3://{s3.bucket}-missing/pool/", "--out",
                                   tmp_path / "x", *TINY))  # fmt: skip
    assert "input not found" in line

    key, secret = s3.server.add_user()
    commands = [
        ["score", pool, "--out", tmp_path / "local", *TINY],  # reading shards (a listing)
        ["score", f"{pool}00000.tar", "--out", tmp_path / "local", *TINY],  # reading a shard
        ["score", corpus, "--out", s3.url("more"), *TINY],  # writing a score set
        ["verify", scores],
        ["status", scores],
        ["select", scores, "--out", tmp_path / "sel", "-b", "8"],
    ]
    with s3.server.checking_credentials():
        for key_id, secret_key in [("testing", "testing"), (key, "not-the-secret")]:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
            s3.fresh_clients()  # s3fs keeps a client's credentials
            for args in commands:
                line = one_line_error(*run_cli(*args))
                assert "permission denied" in line and "check the credentials" in line
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # the server does let a user in
        s3.fresh_clients()
        code, output = run_cli("verify", scores)
        assert code == 0, output
    # no failed marker for a shard that was never allowed to be read
    assert not list((tmp_path / "local").glob("done/*.json"))


def test_without_a_server_these_tests_skip_but_fail_under_ci(tmp_path: Path) -> None:
    """The s3_server fixture, where the server cannot start (its port taken): a skip with the
    reason, but a failure under CI=true."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        here = Path(__file__)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
               f"{here}::test_the_server_keeps_its_objects_across_a_restart"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "JESTCURATE_REQUIRE_S3")}
        env["JESTCURATE_S3_PORT"] = port
        skipped, failed = (
            subprocess.run(cmd, env={**env, **ci}, capture_output=True, text=True, cwd=tmp_path)
            for ci in ({}, {"CI": "true"})
        )
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert "no S3 server here: the S3 server exited with" in skipped.stdout
    assert failed.returncode == 1 and "1 error" in failed.stdout, failed.stdout
    assert "CI=true: the S3 tests must run" in failed.stdout
