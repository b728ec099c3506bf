"""The command line: help, one-line errors with exit code 2, progress lines without a terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from jestcurate.pipelines.synth import PRESETS, shard_samples


def test_help_explains_the_options() -> None:
    code, output = run_cli("score", "--help")
    assert code == 0
    for option in ("--out", "--model", "--pretrained", "--task-index", "--role", "--precision"):
        assert option in output
    code, output = run_cli("--help")
    assert code == 0
    for command in ("score", "status", "select", "dedup", "report", "info", "train", "slurm"):
        assert f" {command} " in output, command
    code, output = run_cli("slurm", "score", "--help")
    assert code == 0 and "--partition" in output and "--retry" in output and "--decode" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/nope/{{0..3}}.tar"], "input not found"),
        (["{corpus}", "--model", "ViT-B-33"], "unknown model 'ViT-B-33'; did you mean"),
        (["{corpus}", "--model", "{tmp}/missing.json"], "model config not found"),
        (["{corpus}", "--pretrained", "not_a_tag"], "unknown pretrained tag 'not_a_tag'"),
        (["{corpus}", "--task-index", "3", "--num-tasks", "2"], "outside 0..1"),
        (["{corpus}", "--device", "cuda"], "no CUDA device"),
        (["{corpus}", "--precision", "fp8"], "unknown precision"),
        (["{corpus}", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["{corpus}", "--role", "teacher"], "unknown role"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, corpus: Path, tmp_path: Path
) -> None:
    filled = [a.format(tmp=tmp_path, corpus=corpus) for a in args]
    if "--model" not in filled:
        filled += ["--model", "jc-tiny"]
    code, output = run_cli("score", *filled, "--out", tmp_path / "out")
    assert code == 2, output
    assert message in output, output
    assert output.startswith("error: ") and output.count("\n") == 1, output
    assert not (tmp_path / "out").exists()  # nothing written on refusal


def test_not_a_model_config(corpus: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cfg.json"
    bad.write_text('{"embed_dim": 4}')
    code, output = run_cli("score", corpus, "--model", bad, "--out", tmp_path / "o")
    assert code == 2 and "is not an open_clip model config" in output


def test_a_model_config_open_clip_cannot_build(corpus: Path, tmp_path: Path) -> None:
    import json

    from jestcurate.model.openclip import BUILTIN_CONFIG_DIR

    config = json.loads((BUILTIN_CONFIG_DIR / "jc-tiny.json").read_text())
    config["no_such_option"] = 1  # open_clip passes unknown keys on to CLIP(): a TypeError
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    code, output = run_cli(
        "score", corpus, "--model", tmp_path / "cfg.json", "--out", tmp_path / "o"
    )
    assert code == 2 and "open_clip cannot build" in output and "no_such_option" in output, output
    assert not (tmp_path / "o" / "meta.json").exists()


def test_plain_log_lines_without_a_terminal(corpus: Path, tmp_path: Path) -> None:
    code, output = run_cli("score", corpus, "--model", "jc-tiny", "--out", tmp_path / "o")
    assert code == 0
    for name in ("00000", "00001", "00002"):
        assert f"INFO shard {name} ok: 24 samples" in output
    assert "throughput" in output and "samples/s on cpu" in output
    code, output = run_cli("score", corpus, "--model", "jc-tiny", "--out", tmp_path / "o")
    assert code == 0 and "3 of 3 shards already done" in output


def test_synth_writes_a_reproducible_corpus(tmp_path: Path) -> None:
    args = ["--shards", 2, "--samples", 5, "--noise", "noisy"]
    code, output = run_cli("synth", tmp_path / "a", *args)
    assert code == 0 and "wrote 2 shards" in output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["00000.tar", "00001.tar"]
    code, output = run_cli("synth", tmp_path / "b", "--noise", "dirty")
    assert code == 2 and "unknown noise preset" in output


def test_synth_noise_kinds_follow_the_preset() -> None:
    from jestcurate.pipelines.synth import CorpusSpec

    spec = CorpusSpec(samples_per_shard=2000, image_size=8, noise=PRESETS["noisy"])
    kinds = [s["json"]["jc_kind"] for s in shard_samples(spec, 0)]
    for kind, share in PRESETS["noisy"].items():
        assert abs(kinds.count(kind) / len(kinds) - share) < 0.04, kind
    dupes = [s for s in shard_samples(spec, 0) if s["json"]["jc_kind"] == "duplicate"]
    assert all(d["jpg"] for d in dupes) and "jc_duplicate_of" in dupes[0]["json"]


def test_usage_errors_are_one_line_like_every_error(tmp_path: Path) -> None:
    """The real entry point (typer's test runner formats usage errors its own way)."""
    from conftest import run_subprocess

    for args, message in (
        (["select", tmp_path, "--out", tmp_path / "o", "--bogus"], "No such option: --bogus"),
        (["select"], "Missing argument"),
        (["select", tmp_path, "--out", tmp_path / "o", "--ratio", "abc"], "'--ratio'"),
        (["select", tmp_path, "--out", tmp_path / "o", "--[/b]"], "No such option: --[/b]"),
    ):
        done = run_subprocess(*args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr and "jestcurate select --help" in done.stderr, done.stderr
    bare = run_subprocess()  # no command: the help once, exit 2, as before
    assert bare.returncode == 2 and (bare.stdout + bare.stderr).count("Usage:") == 1, bare


def test_verbose_after_the_command_and_flags_in_help(tmp_path: Path) -> None:
    import logging
    import re

    jc_log = logging.getLogger("jestcurate")
    for args in (["-v", "synth", tmp_path / "a"], ["synth", tmp_path / "b", "-v"]):
        run_cli("synth", tmp_path / "quiet", "--shards", 1, "--samples", 2)
        assert jc_log.level == logging.INFO
        code, output = run_cli(*args, "--shards", 1, "--samples", 2)
        assert code == 0 and jc_log.level == logging.DEBUG, (args, output)
    code, output = run_cli("select", "--help")
    assert code == 0 and "--verbose" in output and "--overwrite" in output
    flags = [line for line in output.splitlines() if re.search(r"│ +--(export|topk) ", line)]
    assert len(flags) == 2 and not any("<bool>" in line for line in flags), flags
    assert "<float>" in output  # options that take a value still show its type
