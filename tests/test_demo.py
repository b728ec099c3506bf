"""The demo end to end at a reduced size: jest must keep clearly less noise than random."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli

from jestcurate.pipelines import demo

REDUCED = demo.DemoSize(
    guide=(2, 200),
    pool=(4, 200),
    eval=(1, 64),
    learner_shards=1,
    reference_steps=60,
    learner_steps=15,
    train_batch=32,
    select_batch=40,
    ratio=0.25,
)


def test_demo_jest_keeps_less_noise_than_random(tmp_path: Path) -> None:
    report = demo.run(tmp_path / "demo", REDUCED)
    assert sum(report.pool_kinds.values()) == 800
    assert sum(report.kept["jest"].values()) == sum(report.kept["random"].values()) == 200
    jest, random = report.noise_share("jest"), report.noise_share("random")
    assert 0.35 < random < 0.65  # the pool's share of mismatched, junk and blank pairs is 50%
    assert jest < random - 0.2, (jest, random)
    for kind in demo.NOISE:  # each noise kind on its own, not just the total
        assert report.kept["jest"][kind] < report.kept["random"][kind], report.kept
    for method in ("jest", "random"):
        assert (tmp_path / "demo" / "curated" / method / "shards" / "00000.tar").exists()
    assert "kept by jest" in (tmp_path / "demo" / "report.html").read_text()

    # Rerunning reuses every finished stage and gives the same selection.
    again = demo.run(tmp_path / "demo", REDUCED)
    assert again.kept == report.kept


def test_demo_cli_rejects_unknown_sizes(tmp_path: Path) -> None:
    code, output = run_cli("demo", "--out", tmp_path / "d", "--size", "huge")
    assert code == 2 and "unknown size 'huge'" in output
