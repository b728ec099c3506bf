"""Shared fixtures: small generated corpora and helpers to run the CLI and read score sets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jestcurate.cli import app
from jestcurate.errors import first_line
from jestcurate.pipelines.synth import PRESETS, CorpusSpec, hostile_samples, write_corpus, write_tar

# Keep every test on the CPU and quiet about threads on the 2-core CI machine.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

SMALL = CorpusSpec(shards=3, samples_per_shard=24, seed=7, image_size=48, noise=PRESETS["noisy"])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three noisy shards of 24 samples. Read-only: copy it before changing anything."""
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, SMALL)
    return out


@pytest.fixture(scope="session")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A shard with every bad-sample case, and the expected outcome per key."""
    out = tmp_path_factory.mktemp("hostile")
    samples, expected = hostile_samples()
    write_tar(out / "hostile.tar", samples)
    return out / "hostile.tar", expected


@pytest.fixture
def corpus_copy(corpus: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pool"
    shutil.copytree(corpus, dst)
    return dst


def run_cli(*args: str | os.PathLike[str]) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stdout+stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def run_subprocess(*args: str | os.PathLike[str], env: dict[str, str] | None = None, **kw):
    """Run the real console entry point in a new process (for kill/concurrency tests)."""
    cmd = [sys.executable, "-m", "jestcurate", *[str(a) for a in args]]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, **kw)


def read_parts(out: Path) -> pa.Table:
    parts = sorted((out / "parts").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def rewrite_part(part: Path, table: pa.Table) -> None:
    """Replace a part as a tool would (its marker records the new size and hash), for tests
    that edit a score set's rows."""
    import json

    from jestcurate.io.store import write_json_atomic, write_part

    marker_path = part.parent.parent / "done" / f"{part.stem}.json"
    marker = json.loads(marker_path.read_text()) if marker_path.exists() else {"status": "ok"}
    write_json_atomic(marker_path, {**marker, **write_part(part, table)})


def flip_byte(path: Path, at: int | None = None) -> None:
    """Change one byte of a file (by default in the middle): same size, another sha256."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


# A tiny reference set's meta.json (D = 2) for the unit tests of status and verify.
TINY_DIM = 2
TINY_META = {
    "schema_version": 1,
    "role": "reference",
    "model": "jc-tiny",
    "embed_dim": TINY_DIM,
    "logit_scale": 10.0,
    "loss": "softmax",
    "precision": "fp32",
}


def write_marked_part(out: Path, name: str, table: pa.Table, shard: str) -> None:
    """A part and its ok marker (its size and sha256 recorded), as score leaves them."""
    from jestcurate.io.store import write_json_atomic, write_part

    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "done").mkdir(parents=True, exist_ok=True)
    digest = write_part(out / "parts" / f"{name}.parquet", table)
    marker = {"shard": shard, "name": name, "status": "ok", "error": None,
              "counts": {"samples": table.num_rows}, **digest}  # fmt: skip
    write_json_atomic(out / "done" / f"{name}.json", marker)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 API server for the session (moto's, run by tests/s3server.py on 127.0.0.1; on
    $JESTCURATE_S3_PORT if set). Where it cannot start, the tests that need it skip, saying
    why; under CI=true they fail instead."""
    from s3server import S3Server, S3ServerError

    try:
        import s3fs  # noqa: F401 (the tests' client)

        server = S3Server(
            tmp_path_factory.mktemp("s3"), int(os.environ.get("JESTCURATE_S3_PORT", 0))
        )
        server.start()
    except (ImportError, OSError, S3ServerError) as exc:
        reason = f"no S3 server here: {first_line(exc)}"
        if os.environ.get("CI") == "true" or os.environ.get("JESTCURATE_REQUIRE_S3") == "1":
            pytest.fail(f"{reason} (CI=true: the S3 tests must run)", pytrace=False)
        pytest.skip(reason)
    yield server
    server.stop()


@dataclass
class S3:
    """A test's view of the S3 server: its own fresh bucket and an s3fs client."""

    server: Any  # s3server.S3Server
    fs: Any  # s3fs.S3FileSystem
    bucket: str

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}"

    def upload(self, folder: Path, to: str = "pool") -> str:
        """The tars of `folder` put under s3://BUCKET/TO/; returns that folder's URL."""
        for tar in sorted(folder.glob("*.tar")):
            self.fs.put_file(str(tar), f"{self.bucket}/{to}/{tar.name}")
        return self.url(f"{to}/")

    def fresh_clients(self) -> None:
        """Forget s3fs's cached clients (credentials, connections, listings), as a new
        process would: the CLI runs in this process, and s3fs keeps one client per options."""
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        self.fs = s3fs.S3FileSystem()


@pytest.fixture
def s3(s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3:
    """The S3 server's endpoint and test credentials in the environment (this process's and
    its subprocesses'), a mirror cache of the test's own, and a new bucket."""
    s3_server.ensure_running()  # an earlier test may have stopped it and failed
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)  # a developer's own AWS setup stays out
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JESTCURATE_CACHE", str(tmp_path / "cache"))
    found = S3(s3_server, None, f"jc-{uuid.uuid4().hex[:12]}")
    found.fresh_clients()
    found.fs.mkdir(found.bucket)
    return found


# DataComp-layout sources for `import` (test_import, test_slurm): l14 arrays as wide as jc-tiny.
JC_TINY_DIM = 64


def pairs(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, dim)).astype(np.float32) * 3  # not normalised: import does that
    txt = (img + rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32)
    return img, txt


def write_datacomp(folder: Path, shards: int = 2, rows: int = 50) -> dict[str, np.ndarray]:
    """DataComp pool files: NAME.parquet (uid, url, text) and NAME.npz with its four arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for s in range(shards):
        name = f"{s:08d}"
        uids = [f"{s:04x}{i:028x}" for i in range(rows)]
        meta = pa.table(
            {
                "uid": uids,
                "url": [f"https://example.com/{s}/{i}.jpg" for i in range(rows)],
                "text": [f"caption {s} {i}" for i in range(rows)],
                "original_width": [256] * rows,
            }
        )
        pq.write_table(meta, folder / f"{name}.parquet")
        l14_img, l14_txt = pairs(rows, JC_TINY_DIM, s)
        b32_img, b32_txt = pairs(rows, 32, s + 100)
        if s == 0:
            l14_img[3] = 0.0  # a row without a usable embedding
        np.savez(
            folder / f"{name}.npz",
            l14_img=l14_img.astype(np.float16),
            l14_txt=l14_txt.astype(np.float16),
            b32_img=b32_img,
            b32_txt=b32_txt,
        )
        arrays[name] = (l14_img, l14_txt)
    return arrays


def select_summary(ref: Path, out: Path, **kw: Any) -> dict[str, Any]:
    """select on a small score set (b 10 of B 50, 2 chunks, on the CPU, --min-clip-score 0
    unless given); returns its summary. The ledger tests' way in."""
    from jestcurate.math.sampling import SamplerOptions
    from jestcurate.pipelines import select as select_mod

    kw.setdefault("min_clip_score", 0.0)
    sampling = SamplerOptions(10, ratio=0.2, chunks=2)
    cfg = select_mod.SelectConfig(reference=ref, out=out, sampling=sampling, device="cpu", **kw)
    return select_mod.run(cfg).summary
