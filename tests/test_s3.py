"""Remote storage on a real S3 API: moto's server on 127.0.0.1 (tests/s3server.py, started by
conftest's s3_server fixture) with s3fs as the client. Here: the server itself (its objects
survive a restart), and the fixture's rule: without moto or s3fs the S3 tests skip, saying
why; under CI=true they fail instead."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import S3

pytestmark = pytest.mark.slow


def test_the_server_keeps_its_objects_across_a_restart(s3: S3) -> None:
    odd = f"{s3.bucket}/a folder/key+with%odd chars.bin"
    s3.fs.pipe_file(odd, b"\x00\x01" * 1000)
    s3.fs.mkdir(f"{s3.bucket}-empty")
    s3.server.restart()
    s3.fresh_clients()
    assert s3.fs.cat_file(odd) == b"\x00\x01" * 1000
    assert s3.fs.exists(f"{s3.bucket}-empty")
    assert s3.fs.find(s3.bucket) == [odd]


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
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        env["JESTCURATE_S3_PORT"] = port
        skipped, failed = (
            subprocess.run(cmd, env={**env, **ci}, capture_output=True, text=True, cwd=tmp_path)
            for ci in ({}, {"CI": "true"})
        )
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert "no S3 server here: the S3 server exited with" in skipped.stdout
    assert failed.returncode == 1 and "1 error" in failed.stdout, failed.stdout
    assert "CI=true: the S3 tests must run" in failed.stdout
