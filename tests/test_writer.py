"""io/writer.py on its own, in a temporary folder: the steps `score` and `import` take to
write a score set, without a model or a shard."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from jestcurate.errors import JCError
from jestcurate.io.schema import SCHEMA_VERSION, part_table
from jestcurate.io.store import open_score_set
from jestcurate.io.writer import ScoreSetWriter

DIM = 4


@dataclass(frozen=True)
class Unit:
    name: str


def identity(role: str = "reference") -> dict:
    return {"schema_version": SCHEMA_VERSION, "role": role, "model": "m", "precision": "fp32"}


def meta(role: str = "reference") -> dict:
    return {**identity(role), "embed_dim": DIM, "logit_scale": 10.0, "loss": "softmax"}


def write(writer: ScoreSetWriter, name: str, n: int = 3) -> None:
    rows = [
        {"key": f"{name}-{i}", "index": i, "uid": None, "url": None, "caption": "c",
         "sha256": None, "status": "ok", "error": None}
        for i in range(n)
    ]  # fmt: skip
    emb = np.eye(n, DIM, dtype=np.float16)
    table = part_table(f"/in/{name}.tar", rows, emb, emb, np.ones(n), np.zeros(n), DIM)
    digest = writer.write_part(name, table)
    writer.mark(name, {"shard": f"/in/{name}.tar", "name": name, "status": "ok",
                       "counts": {"samples": n}, **digest})  # fmt: skip


def test_a_set_written_step_by_step_opens_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "set"
    writer = ScoreSetWriter(out)
    units = [Unit("a"), Unit("b"), Unit("c")]
    writer.check(identity())  # nothing there yet: nothing to refuse
    writer.open(meta())
    plan = writer.plan(units)
    assert plan.todo == units and plan.forgotten == []
    for unit in plan.todo[:2]:
        write(writer, unit.name)
    scores = open_score_set(out)
    assert scores.part_names() == ["a", "b"] and scores.problems() == []
    assert writer.plan(units).todo == [Unit("c")]
    shards = writer.names(["/in/b.tar", "/elsewhere/b.tar"])  # b keeps the name its marker holds
    assert shards[0].name == "b" and shards[1].name != "b"


def test_a_part_that_no_longer_matches_is_forgotten(tmp_path: Path) -> None:
    writer = ScoreSetWriter(tmp_path)
    writer.open(meta())
    write(writer, "a")
    write(writer, "b")
    part = tmp_path / "parts" / "b.parquet"
    part.write_bytes(part.read_bytes()[:-10])
    plan = writer.plan([Unit("a"), Unit("b")])
    assert plan.todo == [Unit("b")] and [n for n, _ in plan.forgotten] == ["b"]
    assert "damaged" in plan.forgotten[0][1] and not (tmp_path / "done" / "b.json").exists()


def test_a_set_made_otherwise_is_refused_and_strays_set_aside(tmp_path: Path) -> None:
    writer = ScoreSetWriter(tmp_path)
    writer.open(meta())
    with pytest.raises(JCError, match="role: 'reference' there, 'learner' now"):
        writer.check(identity("learner"))
    with pytest.raises(JCError, match="made differently"):
        writer.open(meta("learner"))
    seen = []

    def refuse(wanted: dict) -> None:  # the caller's own check, as import's
        seen.append(wanted)
        raise JCError("mine")

    with pytest.raises(JCError, match="mine"):
        writer.open(meta(), agrees=refuse)
    assert seen == [meta()]
    write(writer, "stray")
    (tmp_path / "done" / "stray.json").unlink()
    plan = writer.plan([Unit("a")])
    assert writer.set_aside(plan, ["a"], live=lambda name: False) == ["stray"]
    assert (tmp_path / "orphaned" / "stray.parquet").is_file()
    assert json.loads((tmp_path / "meta.json").read_text())["role"] == "reference"
