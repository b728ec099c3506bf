"""How far cheaper decoding moves pixels, embeddings and clip_score ranks from the exact path.

    python benchmarks/decode_agreement.py [--models jc-tiny ViT-B-32] [--samples 512]
        [--sizes 256 512] [--photos DIR ...] [--quality 95]

Samples are random crops (position, scale, flip) of real photographs, re-encoded as JPEGs the
way img2dataset stores them (shorter side resized to each --sizes, quality 95), so the JPEGs
carry natural-image frequency content rather than the flat shapes of the synthetic corpus.
Photos come from --photos folders; by default from matplotlib's sample data and the images
scikit-image's wheel bundles, if either is installed (nothing is downloaded).

Variants, each against `pil` (PIL decode at full size, then open_clip's own transform):
* `pil-draft`: Pillow's JPEG draft mode (DCT-domain scaling by 1/2, 1/4 or 1/8, keeping both
  sides at least the transform's resize size), then open_clip's transform, as `score` does;
* `pil-draft x2`: the same keeping both sides at least twice the resize size;
* `torch`: torchvision's decoder and resize on the CPU (`--decode torch`), as a yardstick for
  a difference the project already accepts.
Reported per model and stored size: preprocessing cost per sample on one thread, pixel
agreement (PSNR, largest difference in normalised units), image-embedding cosine with the
exact path (min, 1st percentile, mean), Spearman correlation of clip_score, and how many of the
exact path's top 20 % by clip_score stay in the top 20 %. Models are random-initialised (seed
0): no trained weights can be downloaded here, so the embedding figures measure how far each
variant's pixel change moves a network's output against how far images differ from each other.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jestcurate.io.reader import load_image
from jestcurate.model.devicedecode import DevicePreprocess, draft_size
from jestcurate.model.openclip import ModelSpec, load_model, resolve_spec

CAPTIONS = ("a photo", "a picture of a person", "a close-up", "an animal", "a landscape")


def default_photos() -> list[Path]:
    found: list[Path] = []
    try:
        import matplotlib

        found += sorted(Path(matplotlib.get_data_path(), "sample_data").glob("*.jpg"))
    except ImportError:
        pass
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        for name in ("astronaut", "chelsea", "coffee", "motorcycle_left", "rocket", "retina",
                     "hubble_deep_field", "grass", "gravel", "brick"):  # fmt: skip
            found += sorted(data.glob(f"{name}.*"))
    except ImportError:
        pass
    return found


def photo_crops(photos: list[Path], n: int, size: int, quality: int, seed: int) -> list[bytes]:
    """`n` JPEGs of random crops, shorter side `size`, as img2dataset would store them."""
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in photos]
    out = []
    for _ in range(n):
        image = rng.choice(sources)
        w, h = image.size
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        aspect = rng.uniform(0.75, 1.33)
        cw, ch = min(w, int(side * aspect)), min(h, side)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = image.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = size / min(crop.size)
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def preprocess_all(jpegs: list[bytes], variant: str, transform, target: int):
    """The model inputs for `jpegs` under `variant`, and the seconds that took (one thread)."""
    began = time.perf_counter()
    if variant == "torch":
        on_cpu = DevicePreprocess.from_transform(transform)
        images, bad = on_cpu.batch(jpegs, torch.device("cpu"))
        assert not bad
    else:
        draft = {"pil": None, "pil-draft": target, "pil-draft x2": 2 * target}[variant]
        images = torch.stack([transform(load_image(j, draft=draft)) for j in jpegs])
    return images, time.perf_counter() - began


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(model_name: str, jpegs: list[bytes], captions: list[str]) -> list[dict]:
    model = load_model(resolve_spec(ModelSpec(model_name, None, "cpu", "fp32")), warn_random=False)
    target = draft_size(model.preprocess)
    with torch.inference_mode():
        txt = model.model.encode_text(model.tokenizer(captions))
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
    results, exact = [], None
    for variant in ("pil", "pil-draft", "pil-draft x2", "torch"):
        torch.set_num_threads(1)
        images, seconds = preprocess_all(jpegs, variant, model.preprocess, target)
        torch.set_num_threads(2)
        with torch.inference_mode():
            img = torch.cat([model.model.encode_image(c) for c in images.split(64)])
            img = torch.nn.functional.normalize(img.float(), dim=-1)
        scores = (img * txt).sum(-1).numpy()
        row = {"variant": variant, "ms_per_sample": round(1000 * seconds / len(jpegs), 3)}
        if exact is None:
            exact = (images, img, scores)
        else:
            diff = (images - exact[0]).abs()
            mse = float((diff**2).mean())
            span = float(exact[0].max() - exact[0].min())
            cos = (img * exact[1]).sum(-1).numpy()
            k = len(scores) // 5
            top = set(np.argsort(-exact[2])[:k]) & set(np.argsort(-scores)[:k])
            row.update(
                psnr_db=round(10 * np.log10(span**2 / mse), 1) if mse else None,  # None: same
                max_abs_diff=round(float(diff.max()), 3),
                cosine_min=round(float(cos.min()), 5),
                cosine_p1=round(float(np.percentile(cos, 1)), 5),
                cosine_mean=round(float(cos.mean()), 5),
                clip_score_spearman=round(spearman(exact[2], scores), 4),
                top20_kept=round(len(top) / k, 3),
            )
        results.append(row)
    # Against the spread between images: the cosine of two different images' embeddings.
    other = (exact[1] * exact[1].roll(1, 0)).sum(-1).numpy()
    results[0]["cosine_between_images_mean"] = round(float(other.mean()), 5)
    results[0]["resize_size"] = target
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["jc-tiny", "ViT-B-32"])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--photos", type=Path, nargs="*", default=None)
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    photos = default_photos() if not args.photos else [
        p for d in args.photos for p in sorted(d.iterdir()) if p.suffix.lower() in
        (".jpg", ".jpeg", ".png")
    ]  # fmt: skip
    if not photos:
        raise SystemExit("no photos: pass --photos DIR (matplotlib or scikit-image supply some)")
    rng = random.Random(1)
    captions = [rng.choice(CAPTIONS) for _ in range(args.samples)]
    report = {"cpu": platform.processor() or platform.machine(), "photos": len(photos), "runs": []}
    for size in args.sizes:
        jpegs = photo_crops(photos, args.samples, size, args.quality, seed=size)
        for name in args.models:
            for row in measure(name, jpegs, captions):
                report["runs"].append({"model": name, "stored_px": size, **row})
                print(json.dumps(report["runs"][-1]), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
