"""A full disk: one line naming the path, a non-zero exit, nothing partial visible, and a
rerun after space is freed completes with the same results.

On a real small filesystem (a tmpfs) where this machine lets the test mount one; otherwise a
full disk is injected into the write path (fsync and plain writes raise ENOSPC)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from jestcurate.pipelines.synth import write_score_set


class Disk:
    """A folder on a small filesystem, and a way to fill it and to free it again."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, real: bool) -> None:
        self.root, self.monkeypatch, self.real = root, monkeypatch, real
        self.filler = root / "filler"

    def fill(self, leave: int) -> None:
        """Leave about `leave` bytes free."""
        if self.real:
            free = shutil.disk_usage(self.root).free
            with open(self.filler, "wb") as f:
                f.write(b"\0" * max(0, free - leave))
            return
        import jestcurate.io.files as files
        import jestcurate.io.rowcache as rowcache

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.monkeypatch.setattr(files.os, "fsync", full)
        self.monkeypatch.setattr(rowcache.ColumnWriter, "append", full)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        self.monkeypatch.undo()


@contextmanager
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    root = tmp_path / "small"
    root.mkdir()
    mounted = False
    if not os.environ.get("JESTCURATE_TEST_INJECT_ENOSPC"):  # set it to test the fallback
        with contextlib.suppress(OSError):
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs",
                                      str(root)], capture_output=True).returncode == 0  # fmt: skip
    try:
        yield Disk(root, monkeypatch, mounted)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)


def _no_partial_files(folder: Path) -> None:
    stray = [p for p in folder.rglob(".*") if p.is_file() and p.name.endswith(".tmp")]
    assert not stray, stray


def _refused(code: int, output: str) -> None:
    assert code == 2, output
    assert "no space left" in output and "free space" in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in output and len(errors) == 1, output


def test_score_on_a_full_disk(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    clean = tmp_path / "clean"
    assert run_cli("score", corpus, "-m", "jc-tiny", "--out", clean, "--workers", 0)[0] == 0
    with small_disk(tmp_path, monkeypatch) as disk:
        out = disk.root / "scores"
        disk.fill(leave=24_000)  # meta.json and about one part
        code, output = run_cli("score", corpus, "-m", "jc-tiny", "--out", out, "--workers", 0)
        _refused(code, output)
        _no_partial_files(out)
        markers = {p.stem for p in (out / "done").glob("*.json")}
        assert markers == {p.stem for p in (out / "parts").glob("*.parquet")}  # whole pairs
        assert len(markers) < 3
        disk.free()
        code, output = run_cli("score", corpus, "-m", "jc-tiny", "--out", out, "--workers", 0)
        assert code == 0, output
        for part in sorted((clean / "parts").glob("*.parquet")):
            a = pq.read_table(part, columns=["key", "clip_score"]).to_pydict()
            b = pq.read_table(out / "parts" / part.name, columns=["key", "clip_score"]).to_pydict()
            assert a == b
        assert run_cli("verify", out)[0] == 0


def test_select_dedup_and_export_on_a_full_disk(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = tmp_path / "scores"
    assert run_cli("score", corpus, "-m", "jc-tiny", "--out", scores, "--workers", 0)[0] == 0
    synthetic = tmp_path / "synthetic"
    write_score_set(synthetic, shards=4, rows_per_shard=2000, dim=64, seed=1)
    with small_disk(tmp_path, monkeypatch) as disk:
        jobs = {
            "select": ["select", synthetic, "-b", 64, "--ratio", 0.25, "--out"],
            "dedup": ["dedup", synthetic, "--out"],
            "export": ["select", scores, "-b", 4, "--ratio", 0.5, "--export", "--out"],
        }
        for name, args in jobs.items():
            out = disk.root / name
            clean = tmp_path / f"clean-{name}"
            assert run_cli(*args, clean)[0] == 0
            disk.fill(leave=60_000 if name != "export" else 20_000)
            code, output = run_cli(*args, out)
            _refused(code, output)
            _no_partial_files(out)
            assert not (out / ".cache").exists()
            assert not (out / "summary.json").exists() or name == "export"
            disk.free()
            code, output = run_cli(*args, out)
            assert code == 0, output
            product = {"select": "manifest.parquet", "dedup": "dedup.parquet"}.get(name)
            if product:
                assert (out / product).read_bytes() == (clean / product).read_bytes(), name
            else:
                tars = sorted(p.name for p in (clean / "shards").glob("*.tar"))
                assert tars == sorted(p.name for p in (out / "shards").glob("*.tar"))
                for tar in tars:
                    same = (out / "shards" / tar).read_bytes() == (
                        clean / "shards" / tar
                    ).read_bytes()
                    assert same, tar


def test_train_checkpoint_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jestcurate.errors import JCError
    from jestcurate.pipelines import train as train_mod
    from jestcurate.pipelines.synth import CorpusSpec, write_corpus

    guide = tmp_path / "guide"
    write_corpus(guide, CorpusSpec(shards=1, samples_per_shard=32, seed=5, image_size=32))
    with small_disk(tmp_path, monkeypatch) as disk:
        out = disk.root / "ref.pt"
        cfg = train_mod.TrainConfig(inputs=(str(guide),), out=out, model="jc-tiny", steps=2,
                                    batch_size=16, workers=0)  # fmt: skip
        disk.fill(leave=16_000)
        with pytest.raises(JCError, match="no space left"):
            train_mod.run(cfg)
        assert not out.exists() and not list(disk.root.glob(".*.tmp"))
        disk.free()
        train_mod.run(cfg)
        assert out.is_file()
