"""report and info. The report is opened in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from jestcurate.pipelines.synth import PRESETS, CorpusSpec, hostile_samples, write_corpus, write_tar

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    write_corpus(root / "pool", CorpusSpec(3, 60, 21, 48, PRESETS["noisy"]))
    samples, _ = hostile_samples()
    write_tar(root / "pool" / "hostile.tar", samples)
    code, output = run_cli("score", root / "pool", "-m", "jc-tiny", "--out", root / "scores")
    assert code == 0, output
    code, output = run_cli(
        "select", root / "scores", "--out", root / "sel", "-b", 10, "--method", "clip-score"
    )
    assert code == 0, output
    return root


def chromium(*args: str, page: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("JESTCURATE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=10000", "--hide-scrollbars",
    ]  # fmt: skip
    return subprocess.run(
        [CHROMIUM, *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120
    )


def data_attribute(dom: str, name: str) -> str:
    found = re.search(rf'<body[^>]*\bdata-{name}="([^"]*)"', dom)
    assert found, f"no data-{name} on <body>"
    return found.group(1)


def count_on_page(dom: str, name: str) -> int:
    found = re.search(rf'id="count-{name}" data-value="(\d+)"', dom)
    assert found, f"no count-{name}"
    return int(found.group(1))


def test_report_in_a_real_browser(scored: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    code, output = run_cli(
        "report", scored / "scores", "--selection", scored / "sel", "--out", page
    )
    assert code == 0 and "thumbnails" in output, output
    html = page.read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html

    result = chromium("--dump-dom", page=page, tmp_path=tmp_path)
    dom = result.stdout
    assert data_attribute(dom, "loaded") == "yes", result.stderr[-2000:]
    assert data_attribute(dom, "errors") == "0"
    assert "Uncaught" not in result.stderr
    assert not re.search(r"CONSOLE\(\d+\)\] \"(Uncaught|Error)", result.stderr)
    thumbnails = int(data_attribute(dom, "thumbnails"))
    assert thumbnails == 6 * 12  # highest, lowest, random (12 each) for kept and for dropped
    assert data_attribute(dom, "thumbnails-broken") == "0"

    # The counts on the page are the data's.
    import json

    import pyarrow.parquet as pq

    rows = [r for p in sorted((scored / "scores" / "parts").glob("*.parquet"))
            for r in pq.read_table(p, columns=["status"]).to_pylist()]  # fmt: skip
    ok = sum(r["status"] == "ok" for r in rows)
    kept = json.loads((scored / "sel" / "summary.json").read_text())["counts"]["kept"]
    assert count_on_page(dom, "samples") == len(rows)
    assert count_on_page(dom, "ok") == ok
    assert count_on_page(dom, "errors") == len(rows) - ok > 0
    assert count_on_page(dom, "kept") == kept
    assert count_on_page(dom, "dropped") == ok - kept
    assert count_on_page(dom, "shards") == 4
    assert "image decode failed" in dom  # errors by reason

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,1800", page=page, tmp_path=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_selection_and_with_a_foreign_one(scored: Path, tmp_path: Path) -> None:
    code, output = run_cli(
        "report", scored / "scores", "--out", tmp_path / "r.html", "--thumbnails", 3
    )
    assert code == 0, output
    assert (tmp_path / "r.html").read_text().count('class="thumb"') == 9  # all: 3 grids of 3
    other = tmp_path / "other"
    write_corpus(other / "pool", CorpusSpec(1, 40, 5, 32))
    run_cli("score", other / "pool", "-m", "jc-tiny", "--out", other / "scores")
    code, output = run_cli(
        "report", other / "scores", "--selection", scored / "sel", "--out", tmp_path / "x.html"
    )
    assert code == 2 and "made from another score set" in output, output


def test_info_on_score_sets_and_selections(scored: Path, tmp_path: Path) -> None:
    code, output = run_cli("info", scored / "scores")
    assert code == 0, output
    assert "jc-tiny" in output and "errors" in output and "clip_score" in output
    assert "image decode failed" in output and "4 ok" in output
    code, output = run_cli("info", scored / "sel")
    assert code == 0 and "clip-score" in output and "kept" in output, output
    code, output = run_cli("info", tmp_path)
    assert code == 2 and "is not a score set (meta.json), a selection or a dedup" in output


def test_info_on_a_dedup_output_shows_the_clusters_used(scored: Path, tmp_path: Path) -> None:
    """--clusters defaults to None (the square root of the rows): info shows the number used,
    and the nearest-neighbour cosine dedup measured."""
    import json

    code, output = run_cli("dedup", scored / "scores", "--out", tmp_path / "d", "--device", "cpu")
    assert code == 0, output
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["params"]["clusters"] is None and summary["clusters_used"] > 1
    code, output = run_cli("info", tmp_path / "d")
    assert code == 0, output
    assert re.search(rf"clusters +{summary['clusters_used']} \(default: sqrt of rows\)", output)
    assert "None" not in output and "cluster sizes" in output, output
    assert "nearest-neighbour cosine" in output, output
    assert f"median {summary['nn_cosine']['median']:.6g}" in output, output
    code, output = run_cli("dedup", scored / "scores", "--out", tmp_path / "c", "--clusters", 4)
    assert code == 0, output
    code, output = run_cli("info", tmp_path / "c")
    assert code == 0 and re.search(r"clusters +4 *\n", output), output
