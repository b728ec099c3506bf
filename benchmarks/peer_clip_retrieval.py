"""jestcurate `score` beside clip-retrieval's `inference` on the same shards and the same model.

    python benchmarks/peer_clip_retrieval.py [--models jc-tiny ViT-B-32:1] [--shards 4]
        [--samples 128] [--batch-size 64] [--workers 1] [--image-size 256] [--gpu]
        [--peer-venv DIR] [--workdir DIR] [--check-import] [--marginal]

Each model in --models is run by both tools in turn, in one invocation: a decode-bound one
(jc-tiny, a 64 px model, on 256 px images) and a model-bound one (ViT-B-32); a JSON line per
model and the ratio of the two tools' wall-clock rates. `NAME:N` runs that model on the first
N shards only (a slow model-bound case need not see the thousands of samples a decode-bound one
needs for a steady figure). clip-retrieval learns the project's
own model configs (jc-tiny) through open_clip.add_model_config in a small launcher, then runs
its own `inference` code unchanged.

Both tools get the same synthetic WebDataset shards (256 px JPEGs with captions), the same
open_clip architecture with the same weights (a random-initialised checkpoint saved locally:
nothing is downloaded), the same batch size and decoding worker count, on the CPU in fp32, and
both compute image and text embeddings. clip-retrieval is installed from PyPI into its own
virtual environment (--peer-venv, created if missing) so its pins cannot touch this one.
Reported: wall-clock samples/s for each whole command (start-up included, as a user sees it)
and each tool's start-up-free rate where it can be told (jestcurate's steady rate from its
summary; clip-retrieval prints none, so only its wall clock). With --marginal each tool also
runs on the first half of the shards, and the two runs give each tool's marginal rate (extra
samples over extra seconds: what the next million samples cost) and its fixed start-up cost
(the half run's seconds less its samples at the marginal rate), the same way for both tools.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from jestcurate.pipelines.synth import PRESETS, CorpusSpec, write_corpus


def ensure_peer(venv: Path) -> Path:
    exe = venv / "bin" / "clip-retrieval"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # clip-anytorch, a dependency, still imports pkg_resources, gone from setuptools 81.
        pip = [str(venv / "bin" / "pip"), "install", "-q", "clip-retrieval", "setuptools<81"]
        subprocess.run(pip, check=True)
    return exe


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["jc-tiny", "ViT-B-32:1"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--gpu", action="store_true", help="both tools on CUDA")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--peer-venv", type=Path, default=Path("/tmp/jestcurate-peer-venv"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jestcurate-peer"))
    parser.add_argument(
        "--check-import",
        action="store_true",
        help="also import clip-retrieval's output with `jestcurate import` and compare its "
        "embeddings with jestcurate's own, sample by sample",
    )
    parser.add_argument(
        "--marginal",
        action="store_true",
        help="also run both tools on the first half of the shards: marginal rate and start-up",
    )
    args = parser.parse_args()

    peer = ensure_peer(args.peer_venv)
    work = args.workdir
    pool = work / f"pool-{args.image_size}px-{args.shards}x{args.samples}"
    if not pool.exists():
        spec = CorpusSpec(
            shards=args.shards,
            samples_per_shard=args.samples,
            image_size=args.image_size,
            noise=PRESETS["noisy"],
        )
        write_corpus(pool, spec)
    for model in args.models:
        name, _, shards = model.partition(":")
        result = compare(args, name, int(shards or args.shards), peer, pool, work)
        print(json.dumps(result), flush=True)


def compare(
    args: argparse.Namespace, model_name: str, shards: int, peer: Path, pool: Path, work: Path
) -> dict:
    import open_clip

    from jestcurate.model.openclip import BUILTIN_CONFIG_DIR, _open_clip

    _open_clip()  # teaches open_clip the project's configs (jc-tiny)
    checkpoint = work / f"{model_name}-random.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        model = open_clip.create_model(model_name, pretrained=None)
        torch.save(model.state_dict(), checkpoint)
    device = "cuda" if args.gpu else "cpu"
    peer_env = None if args.gpu else {"CUDA_VISIBLE_DEVICES": ""}

    def pattern(n: int) -> str:
        return str(pool / f"{{00000..{n - 1:05d}}}.tar")

    def jc_cmd(n: int, out: Path) -> list[str]:
        return [
            sys.executable, "-m", "jestcurate", "score", pattern(n), "--out", str(out),
            "-m", model_name, "--pretrained", str(checkpoint), "--batch-size",
            str(args.batch_size), "--workers", str(args.workers), "--device", device,
        ]  # fmt: skip

    launcher = (
        "import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
        "from clip_retrieval.cli import main; sys.exit(main())"
    )

    def cr_cmd(n: int, out: Path) -> list[str]:
        return [
            str(peer.parent / "python"), "-c", launcher, str(BUILTIN_CONFIG_DIR),
            "inference", "--input_dataset", pattern(n), "--output_folder", str(out),
            "--input_format", "webdataset", "--clip_model", f"open_clip:{model_name}/{checkpoint}",
            "--batch_size", str(args.batch_size), "--num_prepro_workers", str(args.workers),
            "--enable_text", "True", "--enable_image", "True", "--enable_metadata", "False",
            "--use_jit", "False", "--enable_wandb", "False",
        ]  # fmt: skip

    total = shards * args.samples
    out = work / f"jc-{time.time_ns()}"
    jc_seconds, jc_log = timed(jc_cmd(shards, out))
    steady = re.search(r"throughput\s+([\d,.]+) samples/s", jc_log)
    peer_out = work / f"cr-{time.time_ns()}"
    cr_seconds, cr_log = timed(cr_cmd(shards, peer_out), env=peer_env)
    embeddings = sorted((peer_out / "img_emb").glob("*.npy"))
    if not embeddings:
        sys.exit(f"clip-retrieval wrote no image embeddings:\n{cr_log[-3000:]}")
    peer_version = subprocess.run(
        [str(peer.parent / "pip"), "show", "clip-retrieval"],
        capture_output=True,
        text=True,
    ).stdout
    version = re.search(r"Version: (\S+)", peer_version)
    result = {
        "model": model_name,
        "device": device,
        "image_size": args.image_size,
        "samples": total,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "jestcurate_wall_s": round(jc_seconds, 1),
        "jestcurate_wall_samples_per_s": round(total / jc_seconds, 2),
        "jestcurate_steady_samples_per_s": steady and float(steady.group(1).replace(",", "")),
        "clip_retrieval_version": version and version.group(1),
        "clip_retrieval_wall_s": round(cr_seconds, 1),
        "clip_retrieval_wall_samples_per_s": round(total / cr_seconds, 2),
        "wall_ratio": round(cr_seconds / jc_seconds, 2),
    }
    if args.marginal and shards >= 2:
        half = shards // 2
        jc_half, _ = timed(jc_cmd(half, work / f"jc-{time.time_ns()}"))
        cr_half, _ = timed(cr_cmd(half, work / f"cr-{time.time_ns()}"), env=peer_env)
        n_half = half * args.samples
        runs = (("jestcurate", jc_seconds, jc_half), ("clip_retrieval", cr_seconds, cr_half))
        for tool, full_s, half_s in runs:
            rate = (total - n_half) / max(full_s - half_s, 1e-9)
            result[f"{tool}_half_wall_s"] = round(half_s, 1)
            result[f"{tool}_marginal_samples_per_s"] = round(rate, 1)
            result[f"{tool}_startup_s"] = round(half_s - n_half / rate, 1)
        result["marginal_ratio"] = round(
            result["jestcurate_marginal_samples_per_s"]
            / result["clip_retrieval_marginal_samples_per_s"],
            2,
        )
    if args.check_import:
        result.update(check_import(peer_out, out, model_name, checkpoint, work))
    return result


def check_import(peer_out: Path, scored: Path, model: str, checkpoint: Path, work: Path) -> dict:
    """Import clip-retrieval's embeddings and compare them, by sample key, with the embeddings
    `jestcurate score` computed from the same shards and weights."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jestcurate.io.store import embedding_matrix

    imported = work / f"imported-{time.time_ns()}"
    timed([
        sys.executable, "-m", "jestcurate", "import", str(peer_out), "--format",
        "clip-retrieval", "-m", model, "--pretrained", str(checkpoint), "--out", str(imported),
    ])  # fmt: skip

    def rows(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        table = pa.concat_tables(pq.read_table(p) for p in sorted((folder / "parts").glob("*")))
        ok = np.array(table.column("status").to_pylist()) == "ok"
        img, txt = (
            embedding_matrix(table.column("img_emb")),
            embedding_matrix(table.column("txt_emb")),
        )
        keys = table.column("key").to_pylist()
        return {k: (img[i], txt[i]) for i, k in enumerate(keys) if ok[i]}

    ours, theirs = rows(scored), rows(imported)
    common = sorted(set(ours) & set(theirs))
    cos_img = [float(ours[k][0] @ theirs[k][0]) for k in common]
    cos_txt = [float(ours[k][1] @ theirs[k][1]) for k in common]
    return {
        "import_samples_matched": len(common),
        "import_samples_only_scored": len(set(ours) - set(theirs)),
        "import_img_cosine_min": round(min(cos_img), 5),
        "import_img_cosine_mean": round(float(np.mean(cos_img)), 5),
        "import_txt_cosine_min": round(min(cos_txt), 5),
        "import_txt_cosine_mean": round(float(np.mean(cos_txt)), 5),
    }


if __name__ == "__main__":
    main()
