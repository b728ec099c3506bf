from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jestcurate.errors import JCError
from jestcurate.io.shards import (
    Shard,
    assign_names,
    expand_inputs,
    open_shard,
    shard_stem,
)
from jestcurate.scale.tasks import for_task, resolve_task


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directory_lists_only_tars_sorted(tmp_path: Path) -> None:
    for name in ("00002.tar", "00000.tar", "00001.tar", "00000.parquet", "00000_stats.json"):
        touch(tmp_path / name)
    got = expand_inputs([str(tmp_path)])
    assert [Path(p).name for p in got] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(Path(p).is_absolute() for p in got)


def test_brace_pattern_and_order_kept(tmp_path: Path) -> None:
    for i in range(5):
        touch(tmp_path / f"{i:05d}.tar")
    got = expand_inputs([f"{tmp_path}/{{00003..00004}}.tar", f"{tmp_path}/{{00000..00001}}.tar"])
    assert [Path(p).stem for p in got] == ["00003", "00004", "00000", "00001"]


def test_list_file_glob_and_duplicates(tmp_path: Path) -> None:
    for i in range(3):
        touch(tmp_path / "d" / f"{i}.tar")
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# comment\n{tmp_path}/d/1.tar\n\n{tmp_path}/d/*.tar\n")
    got = expand_inputs([f"@{listing}"])
    assert [Path(p).name for p in got] == ["1.tar", "0.tar", "2.tar"]


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "a.tar")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["a.tar"]) == [str(tmp_path / "a.tar")]
    assert expand_inputs([f"file://{tmp_path}/a.tar"]) == [str(tmp_path / "a.tar")]


def test_missing_inputs_are_one_error(tmp_path: Path) -> None:
    touch(tmp_path / "00000.tar")
    with pytest.raises(JCError, match=r"input not found: .*00001.tar \(and 1 more\)"):
        expand_inputs([f"{tmp_path}/{{00000..00002}}.tar"])
    with pytest.raises(JCError, match=r"no \.tar files"):
        expand_inputs([str(touch(tmp_path / "empty" / "x.json").parent)])
    with pytest.raises(JCError, match="shard list not found"):
        expand_inputs([f"@{tmp_path}/nope.txt"])


def test_unknown_url_scheme_is_one_error() -> None:
    with pytest.raises(JCError, match="cannot read nosuchproto:// inputs"):
        expand_inputs(["nosuchproto://bucket/x.tar"])


def test_fsspec_urls_and_remote_folders() -> None:
    fs = fsspec.filesystem("memory")
    for name in ("b.tar", "a.tar", "notes.txt"):
        with fs.open(f"/jc-test/{name}", "wb") as f:
            f.write(name.encode())
    assert expand_inputs(["memory://jc-test/a.tar"]) == ["memory://jc-test/a.tar"]
    assert expand_inputs(["memory://jc-test/"]) == [
        "memory:///jc-test/a.tar",
        "memory:///jc-test/b.tar",
    ]
    assert expand_inputs(["memory://jc-test/*.tar"])[-1].endswith("/jc-test/b.tar")
    with open_shard("memory://jc-test/b.tar") as f:
        assert f.read() == b"b.tar"


def test_stems_and_collisions() -> None:
    assert shard_stem("/x/00042.tar") == "00042"
    assert shard_stem("s3://b/p/00042.tar.gz") == "00042"
    assert shard_stem("https://h/p/weird name.tar?sig=1") == "weird_name"
    urls = ["/a/00000.tar", "/b/00000.tar", "/a/00001.tar"]
    names = [s.name for s in assign_names(urls)]
    assert names[2] == "00001"
    assert names[0].startswith("00000-") and names[1].startswith("00000-")
    assert names[0] != names[1]
    assert assign_names(urls) == assign_names(urls)  # stable


def test_existing_owner_keeps_plain_name() -> None:
    # /a/00000.tar was scored alone earlier; adding /b/00000.tar must not rename it.
    shards = assign_names(["/a/00000.tar", "/b/00000.tar"], owners={"00000": "/a/00000.tar"})
    assert shards[0] == Shard("/a/00000.tar", "00000")
    assert shards[1].name.startswith("00000-")
    # A different shard that owns the stem forces a hashed name even without a collision.
    (lone,) = assign_names(["/c/00000.tar"], owners={"00000": "/a/00000.tar"})
    assert lone.name.startswith("00000-")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "13",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            (3, 4),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "9",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "5",
            },
            (4, 5),
        ),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, (2, 3)),
    ],
)
def test_task_from_slurm_env(env: dict[str, str], expected: tuple[int, int]) -> None:
    assert resolve_task(None, None, env) == expected


def test_task_flags_win_and_are_checked() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_task(1, 2, env) == (1, 2)
    with pytest.raises(JCError, match="together"):
        resolve_task(1, None, {})
    with pytest.raises(JCError, match=r"outside 0\.\.1"):
        resolve_task(2, 2, {})
    with pytest.raises(JCError, match="cannot place array task"):
        resolve_task(None, None, {**env, "SLURM_ARRAY_TASK_STEP": "2"})


@given(n=st.integers(0, 200), count=st.integers(1, 17))
def test_tasks_partition_the_shards(n: int, count: int) -> None:
    shards = [Shard(f"/s/{i}.tar", str(i)) for i in range(n)]
    seen = [s for i in range(count) for s in for_task(shards, i, count)]
    assert sorted(seen, key=lambda s: int(s.name)) == shards
    sizes = [len(for_task(shards, i, count)) for i in range(count)]
    assert max(sizes) - min(sizes) <= 1
