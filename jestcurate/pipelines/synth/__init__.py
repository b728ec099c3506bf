"""Synthetic data for tests, benchmarks and the demo, no downloads: img2dataset-style corpora
(corpus), evaluation sets and planted near copies (evalsets), hostile input (hostile) and
score sets made without a model (scoresets)."""

from jestcurate.pipelines.synth.corpus import (
    CLASSES,
    COLORS,
    NOISE_KINDS,
    PRESETS,
    SHAPES,
    CorpusSpec,
    blank_image,
    class_caption,
    colour_field,
    draw_image,
    encode,
    near_copy,
    shard_samples,
    write_corpus,
    write_tar,
)
from jestcurate.pipelines.synth.evalsets import (
    EVAL_TEMPLATES,
    Plant,
    class_name,
    write_plant,
    write_retrieval_set,
    write_zeroshot_set,
)
from jestcurate.pipelines.synth.hostile import (
    hostile_samples,
    png_with_header,
    write_truncated_tar,
)
from jestcurate.pipelines.synth.scoresets import plant_duplicates, write_score_set

__all__ = [
    "CLASSES",
    "COLORS",
    "EVAL_TEMPLATES",
    "NOISE_KINDS",
    "PRESETS",
    "SHAPES",
    "CorpusSpec",
    "Plant",
    "blank_image",
    "class_caption",
    "class_name",
    "colour_field",
    "draw_image",
    "encode",
    "hostile_samples",
    "near_copy",
    "plant_duplicates",
    "png_with_header",
    "shard_samples",
    "write_corpus",
    "write_plant",
    "write_retrieval_set",
    "write_score_set",
    "write_tar",
    "write_truncated_tar",
    "write_zeroshot_set",
]
