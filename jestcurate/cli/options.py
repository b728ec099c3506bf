"""Options that several commands share (inputs, model, devices, array tasks, Slurm), and the
score-set locations they name."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# Options shared by `score` and `slurm score`.
Inputs = Annotated[
    list[str],
    typer.Argument(
        help="Shards: tar paths, directories of tars, brace patterns "
        "('pool/{00000..00099}.tar'), globs, fsspec URLs (s3://, gs://, https://) "
        "or @list.txt files with one of those per line.",
        show_default=False,
    ),
]

ScoreOut = Annotated[
    str,
    typer.Option(
        "--out",
        "-o",
        help="Score-set directory to write: a path, or an fsspec URL (s3://, gs://, ...) that "
        "is written through a local mirror.",
    ),
]


def score_set_dir(location: str) -> Path:
    """A score set given as a path or a URL, as a local folder (a URL is mirrored first)."""
    from jestcurate.io.remote import local_dir

    return local_dir(location, ("meta.json", "done/*.json", "parts/*.parquet"))


Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="open_clip model name (ViT-B-32, jc-tiny, ...) or a model-config .json path.",
    ),
]

Pretrained = Annotated[
    str | None,
    typer.Option(
        help="open_clip pretrained tag or checkpoint path (state_dict or "
        "{'state_dict': ...}). Without it the weights are random from a fixed seed.",
    ),
]

BatchSize = Annotated[
    int | None,
    typer.Option(
        help="Samples per model batch. Default: 256 on CUDA, 64 on a CPU, where shorter forward "
        "passes leave the decoding workers more gaps (docs/benchmarks.md).",
        show_default=False,
    ),
]

Device = Annotated[str, typer.Option(help="auto, cpu or cuda (auto: cuda when present).")]

Precision = Annotated[
    str | None,
    typer.Option(help="fp32, bf16 or fp16 autocast. Default: fp32 on CPU, bf16 on CUDA."),
]

Workers = Annotated[
    int | None,
    typer.Option(
        help="Decoding worker processes (0: decode in the main process). Default: every core "
        "but one (at most 32) with CUDA, half the cores on a CPU, where they run niced beside "
        "the model when its threads sleep (the default, docs/benchmarks.md)."
    ),
]

Decode = Annotated[
    str,
    typer.Option(
        help="auto (torch where the model's transform allows, else pil; an existing score set "
        "keeps its own), pil "
        "(open_clip's own preprocessing, exact), pil-draft (JPEGs at least twice the model's "
        "input size decoded at 1/2, 1/4 or 1/8 scale by Pillow's draft mode, then open_clip's "
        "preprocessing: several times cheaper, pixels differ slightly) or torch: JPEGs decoded "
        "and preprocessed in batches by torchvision, on the GPU (nvJPEG) or in the CPU "
        "workers; embeddings agree closely, not bit for bit. The choice is part of the score "
        "set's identity.",
    ),
]

Role = Annotated[str, typer.Option(help="reference (the frozen guide-trained model) or learner.")]

TaskIndex = Annotated[
    int | None,
    typer.Option(help="This task's index in an array job. Default: from Slurm variables."),
]

NumTasks = Annotated[
    int | None,
    typer.Option(help="Number of tasks in the array job. Default: from Slurm variables."),
]

SlurmPartition = Annotated[str | None, typer.Option(help="Slurm partition.")]

SlurmMem = Annotated[str | None, typer.Option(help="Memory per node, as sbatch --mem.")]

SlurmTime = Annotated[str, typer.Option(help="Time limit per task, as sbatch --time.")]

SlurmMaxConcurrent = Annotated[
    int | None, typer.Option(help="Most tasks running at once (the %N of --array).")
]

SlurmAccount = Annotated[str | None, typer.Option(help="Slurm account.")]

SlurmQos = Annotated[str | None, typer.Option(help="Slurm QOS.")]

SlurmMaxArraySize = Annotated[
    int | None,
    typer.Option(help="The cluster's MaxArraySize (default: from scontrol, else 1001)."),
]

SlurmExtra = Annotated[
    list[str] | None,
    typer.Option(help="Another sbatch option for the script, e.g. --sbatch constraint=a100."),
]

SlurmSubmit = Annotated[bool, typer.Option("--submit", help="Submit with sbatch.")]

# Options shared by `import` and `slurm import`.
ImportSource = Annotated[
    Path,
    typer.Argument(
        help="datacomp: a pool folder of NAME.parquet + NAME.npz; clip-retrieval: the "
        "inference output folder (img_emb/, text_emb/, metadata/)."
    ),
]

ImportOut = Annotated[Path, typer.Option("--out", "-o", help="The score set to write.")]

ImportFormat = Annotated[str, typer.Option("--format", help="datacomp or clip-retrieval.")]

ImportPretrained = Annotated[
    str | None,
    typer.Option(
        help="open_clip tag or checkpoint of the model that made the embeddings (its logit "
        "scale and bias are read from it), or a label when --logit-scale is given."
    ),
]

ImportEmbeddings = Annotated[
    str, typer.Option(help="datacomp: l14 (ViT-L/14) or b32 (ViT-B/32) arrays.")
]

LogitScale = Annotated[
    float | None,
    typer.Option(
        help="α = exp(logit_scale) of the model, when its weights are not at hand "
        "(OpenAI's CLIP: 100). Then no model is loaded."
    ),
]

LogitBias = Annotated[
    float | None, typer.Option(help="With --logit-scale: a SigLIP model's logit bias.")
]

ImportLoss = Annotated[
    str | None,
    typer.Option(help="With --logit-scale: softmax or sigmoid (default: sigmoid with a bias)."),
]

ImportShards = Annotated[
    list[str] | None,
    typer.Option(
        "--shards",
        help="The downloaded WebDataset shards (paths, globs, {a..b} or @list.txt, as score "
        "takes them): one part per shard, a row per sample, its embeddings found by uid "
        "(img2dataset's sidecar SHARD.parquet, else the samples' json).",
    ),
]
