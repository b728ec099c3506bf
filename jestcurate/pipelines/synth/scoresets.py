"""Synthetic score sets, without a model, for select's tests and benchmarks."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

# --- synthetic score sets, for select's tests and benchmarks --------------------------------


def write_score_set(
    out: str | os.PathLike[str],
    shards: int,
    rows_per_shard: int,
    dim: int = 64,
    seed: int = 0,
    role: str = "reference",
    loss: str = "softmax",
    logit_scale: float = 20.0,
    noisy_fraction: float = 0.5,
    error_fraction: float = 0.0,
    noise: float = 0.3,
    exact_losses: bool = True,
) -> set[str]:
    """Write a score set (the same files `score` writes) without any model: clean rows have a
    caption embedding near the image's, noisy rows an unrelated one. Shard and key layout match
    write_corpus's, so two sets made with different `role`/`seed` join. Returns the noisy keys.

    The corpus side (which rows are noisy, keys, uids) depends on `shards` and
    `rows_per_shard` only; `seed` changes the embeddings, as a different model would.
    `exact_losses=False` stores -logit_scale * clip_score as ref_loss instead of the shard-level
    loss (whose n x n cost dominates at benchmark sizes); meta.json says so.
    """
    from jestcurate.io.store import SCHEMA_VERSION, write_json_atomic, write_part

    out = Path(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "done").mkdir(parents=True, exist_ok=True)
    bias = -10.0 if loss == "sigmoid" else None
    meta = {
        "schema_version": SCHEMA_VERSION,
        "role": role,
        "model": f"synthetic-{dim}",
        "model_config_path": None,
        "model_config_sha256": None,
        "pretrained": None,
        "pretrained_sha256": None,
        "init_seed": seed,
        "embed_dim": dim,
        "logit_scale": logit_scale,
        "logit_bias": bias,
        "loss": loss,
        "precision": "fp32",
        "preprocess": {},
        "context_length": 0,
        "ref_loss": "synthetic" if exact_losses else "synthetic stand-in: -logit_scale * clip",
        "tool": "jestcurate",
        "tool_version": "synthetic",
    }
    write_json_atomic(out / "meta.json", meta)
    noisy_keys: set[str] = set()
    for shard in range(shards):
        corpus = np.random.default_rng([shard, 1])  # what the data is
        model = np.random.default_rng([seed, shard, 2])  # how this "model" embeds it
        n = rows_per_shard
        noisy = corpus.random(n) < noisy_fraction
        errors = corpus.random(n) < error_fraction
        uids = corpus.bytes(16 * n).hex()
        concept = model.standard_normal((n, dim), dtype=np.float32)
        img = concept + noise * model.standard_normal((n, dim), dtype=np.float32)
        txt = concept + noise * model.standard_normal((n, dim), dtype=np.float32)
        txt[noisy] = model.standard_normal((int(noisy.sum()), dim), dtype=np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        name = f"{shard:05d}"
        noisy_keys.update(f"{name}{i:04d}" for i in np.flatnonzero(noisy))
        rows = [
            {
                "key": f"{name}{i:04d}",
                "index": i,
                "uid": uids[32 * i : 32 * (i + 1)],
                "url": None,
                "caption": None,
                "sha256": None,
                "status": "error" if errors[i] else "ok",
                "error": "image decode failed: synthetic" if errors[i] else None,
            }
            for i in range(n)
        ]
        scores = (logit_scale, bias, loss, exact_losses)
        table = _synthetic_part(name, rows, img[~errors], txt[~errors], scores, dim)
        digest = write_part(out / "parts" / f"{name}.parquet", table)
        marker = {"shard": f"/synthetic/{name}.tar", "name": name, "status": "ok", "error": None,
                  **digest}  # fmt: skip
        write_json_atomic(out / "done" / f"{name}.json", marker)
    return noisy_keys


def _synthetic_part(
    name: str, rows: list[dict[str, Any]], img: np.ndarray, txt: np.ndarray, scores: tuple, dim: int
) -> Any:
    """A part table of the ok rows' float16 embeddings and the scores `score` would compute
    from them (or, without exact losses, -logit_scale * clip_score as ref_loss)."""
    import torch

    from jestcurate.io.store import part_table
    from jestcurate.math.scoring import clip_scores, example_losses

    logit_scale, bias, loss, exact_losses = scores
    img16 = torch.from_numpy(img).half()
    txt16 = torch.from_numpy(txt).half()
    clip = clip_scores(img16, txt16)
    if exact_losses:
        losses = example_losses(img16, txt16, logit_scale, bias, loss)
    else:
        losses = -logit_scale * clip
    table = part_table(
        f"/synthetic/{name}.tar", rows, img16.numpy(), txt16.numpy(), clip.numpy(),
        losses.numpy(), dim,
    )  # fmt: skip
    return table


def plant_duplicates(
    score_set: str | os.PathLike[str],
    exact: float,
    near: float,
    similarity: float = 0.98,
    seed: int = 0,
) -> list[set[tuple[str, str]]]:
    """Rewrite a synthetic score set so that a fraction `exact` of its ok rows are exact copies
    of other rows (same image hash, embeddings and scores) and a fraction `near` are near copies
    (an image embedding at cosine `similarity` to the source's, their own caption), sources and
    copies spread over all shards. Every ok row gets an image hash. For dedup tests and
    benchmarks; ref_loss of near copies is left as it was.

    Returns the planted groups, each the (shard, key) of a source and all its copies.
    """
    import pyarrow.parquet as pq

    from jestcurate.io.store import (
        embedding_column,
        embedding_matrix,
        score_column,
        write_json_atomic,
        write_part,
    )

    parts = sorted(Path(score_set, "parts").glob("*.parquet"))
    tables = [pq.read_table(p) for p in parts]
    img = [embedding_matrix(t.column("img_emb")) for t in tables]
    txt = [embedding_matrix(t.column("txt_emb")) for t in tables]
    clip = [t.column("clip_score").to_numpy(zero_copy_only=False).copy() for t in tables]
    loss = [t.column("ref_loss").to_numpy(zero_copy_only=False).copy() for t in tables]
    sha = [
        [
            hashlib.sha256(f"{s}/{k}".encode()).hexdigest() if status == "ok" else None
            for s, k, status in zip(
                t.column("shard").to_pylist(),
                t.column("key").to_pylist(),
                t.column("status").to_pylist(),
                strict=True,
            )
        ]
        for t in tables
    ]
    where = [
        (p, i)
        for p, t in enumerate(tables)
        for i, status in enumerate(t.column("status").to_pylist())
        if status == "ok"
    ]
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(where))
    n_exact, n_near = int(exact * len(where)), int(near * len(where))
    pool = order[n_exact + n_near :]  # rows left as they were: the only sources
    sources = pool[rng.integers(0, len(pool), size=n_exact + n_near)]
    groups: dict[int, set[tuple[str, str]]] = {}

    def ident(row: int) -> tuple[str, str]:
        p, i = where[row]
        return tables[p].column("shard")[i].as_py(), tables[p].column("key")[i].as_py()

    for j, (copy, source) in enumerate(zip(order[: n_exact + n_near], sources, strict=True)):
        (cp, ci), (sp, si) = where[copy], where[source]
        if j < n_exact:
            img[cp][ci], txt[cp][ci] = img[sp][si], txt[sp][si]
            clip[cp][ci], loss[cp][ci], sha[cp][ci] = clip[sp][si], loss[sp][si], sha[sp][si]
        else:
            src = img[sp][si] / np.linalg.norm(img[sp][si])
            side = rng.standard_normal(len(src)).astype(np.float32)
            side -= (side @ src) * src  # orthogonal to the source
            side /= np.linalg.norm(side)
            new = similarity * src + math.sqrt(1 - similarity**2) * side
            img[cp][ci] = new
            clip[cp][ci] = float(new @ txt[cp][ci] / np.linalg.norm(txt[cp][ci]))
        groups.setdefault(int(source), {ident(source)}).add(ident(copy))

    for p, (path, table) in enumerate(zip(parts, tables, strict=True)):
        ok = np.array([s == "ok" for s in table.column("status").to_pylist()])
        dim = img[p].shape[1]
        replace = {
            "sha256": pa.array(sha[p], pa.string()),
            "img_emb": embedding_column(img[p][ok], ok, dim),
            "txt_emb": embedding_column(txt[p][ok], ok, dim),
            "clip_score": score_column(clip[p][ok], ok),
            "ref_loss": score_column(loss[p][ok], ok),
        }
        for name, column in replace.items():
            table = table.set_column(table.schema.get_field_index(name), name, column)
        marker_path = Path(score_set, "done", f"{path.stem}.json")
        marker = json.loads(marker_path.read_text())
        write_json_atomic(marker_path, {**marker, **write_part(path, table)})
    return list(groups.values())
