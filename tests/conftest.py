"""Shared fixtures: small generated corpora and helpers to run the CLI and read score sets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jestcurate.cli import app
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
