"""`select`, `slurm select`, `dedup` and `decontaminate`: choosing training batches, dropping
duplicates and near copies of evaluation images."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from jestcurate.cli.app import app, command_options, config_from, one_line_errors, slurm_app
from jestcurate.cli.options import (
    NumTasks,
    SlurmAccount,
    SlurmExtra,
    SlurmMaxArraySize,
    SlurmMaxConcurrent,
    SlurmMem,
    SlurmPartition,
    SlurmQos,
    SlurmSubmit,
    SlurmTime,
    score_set_dir,
)


@app.command(short_help="Choose JEST (or baseline) training batches from score sets.")
@one_line_errors
def select(
    reference: Annotated[
        str,
        typer.Argument(
            help="Reference score set (made by `score`, role reference): a path or a URL.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Selection directory to write.")],
    learner: Annotated[
        str | None,
        typer.Option(help="Learner score set of the same shards (`score --role learner`)."),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="jest (joint selection per super-batch), learnability or easy-ref (independent "
            "top-k in the same super-batches), clip-score (global top fraction) or random."
        ),
    ] = "jest",
    score: Annotated[
        str | None,
        typer.Option(
            help="jest's batch score: learnability (learner minus reference loss), easy-ref "
            "(minus reference loss) or hard-learner. Default: learnability with --learner, "
            "else easy-ref."
        ),
    ] = None,
    ratio: Annotated[
        float, typer.Option(help="Kept fraction (the paper's 1 - f); super-batches hold b / ratio.")
    ] = 0.2,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Training batch size b.")
    ] = (4096),
    sampler: Annotated[
        str,
        typer.Option(
            help="jest: refine (start from the independent top-b, then re-draw each chunk given "
            "the rest of the batch, keeping it only if it raises the batch score: never "
            "below independent top-k) or paper (the paper's Algorithm 1 as written)."
        ),
    ] = "refine",
    chunks: Annotated[
        int | None,
        typer.Option(
            help="jest: chunks each batch is drawn in, at most b. Default: 16 (b if less)."
        ),
    ] = None,
    sweeps: Annotated[
        int, typer.Option(help="jest --sampler refine: passes over the batch's chunks.")
    ] = 1,
    pool: Annotated[
        float,
        typer.Option(
            help="jest --sampler refine: re-draw chunks from the best pool x b candidates by "
            "independent score (all B when larger)."
        ),
    ] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed of the permutation, shuffles and draws.")] = 0,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="jest: draw chunks ∝ exp(score / T). refine: T in units of the spread (std) "
            "of the candidates' conditional scores, default 0.1; paper: in loss units, "
            "default 1."
        ),
    ] = None,
    topk: Annotated[
        bool, typer.Option("--topk", help="jest: take each chunk's top scores (deterministic).")
    ] = False,
    min_clip_score: Annotated[
        float | None, typer.Option(help="Drop rows whose reference clip_score is below this first.")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many batches (default: as many as fit).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda, for the jest sampler.")] = "auto",
    export: Annotated[
        bool,
        typer.Option(
            "--export",
            help="Also write the kept samples, original bytes, to OUT/shards/NNNNN.tar in step "
            "order, json extended with their scores, and the list to OUT/shards.txt.",
        ),
    ] = False,
    samples_per_shard: Annotated[
        int | None,
        typer.Option(help="With --export: samples per shard, rounded to whole batches (10000)."),
    ] = None,
    dedup: Annotated[
        Path | None,
        typer.Option(help="A `jestcurate dedup` output: the duplicates it dropped are excluded."),
    ] = None,
    exclude: Annotated[
        list[Path] | None,
        typer.Option(
            help="A `jestcurate decontaminate` output: the rows it names are excluded "
            "(repeatable; combines with --dedup).",
        ),
    ] = None,
    balance_clusters: Annotated[
        bool,
        typer.Option(
            "--balance-clusters",
            help="With --dedup: no cluster takes more than twice its even share of any batch "
            "(of the kept set for random and clip-score).",
        ),
    ] = False,
    cluster_quotas: Annotated[
        str | None,
        typer.Option(
            help="density, with --dedup: each dedup cluster keeps its own quota of the kept "
            "rows, more from diffuse, isolated clusters (density-based pruning, Abbas et al. "
            "2024); of each batch's share for the super-batch methods. Instead of "
            "--balance-clusters.",
        ),
    ] = None,
    quota_temperature: Annotated[
        float | None,
        typer.Option(
            help="--cluster-quotas density: the softmax temperature over cluster complexity "
            "(default 0.5; larger: nearer equal quotas)."
        ),
    ] = None,
    quota_floor: Annotated[
        float | None,
        typer.Option(
            help="--cluster-quotas density: every cluster keeps at least this fraction of an "
            "even share of the kept rows (or all but one of its rows, if fewer), as the "
            "authors' cls_bal_ratio (default 0.5; 0: at least one row)."
        ),
    ] = None,
    min_caption_words: Annotated[
        int | None, typer.Option(help="Filter: drop rows whose caption has fewer words.")
    ] = None,
    max_caption_words: Annotated[
        int | None, typer.Option(help="Filter: drop rows whose caption has more words.")
    ] = None,
    min_caption_chars: Annotated[
        int | None, typer.Option(help="Filter: drop rows whose caption has fewer characters.")
    ] = None,
    max_caption_chars: Annotated[
        int | None, typer.Option(help="Filter: drop rows whose caption has more characters.")
    ] = None,
    language: Annotated[
        list[str] | None,
        typer.Option(
            help="Filter: keep rows whose caption is in this language, an ISO 639-1 code "
            "(repeatable, or a comma list), identified by lingua (pip install "
            "'jestcurate[filters]').",
            show_default=False,
        ),
    ] = None,
    target: Annotated[
        Path | None,
        typer.Option(
            help="Filter: a score set of target images (a guide split, scored with the "
            "reference's model) for --target-filter."
        ),
    ] = None,
    target_filter: Annotated[
        str | None,
        typer.Option(
            help="clusters (keep rows in the pool's k-means clusters nearest the target "
            "images, DataComp's image-based filter), normsim2 or normsiminf (NormSim: the "
            "2-norm or max of a row's image cosines to the target images)."
        ),
    ] = None,
    target_keep: Annotated[
        float | None,
        typer.Option(
            help="normsim: keep this top fraction F by NormSim of the reference's ok rows, "
            "all of them, whatever the other filters remove (F means the same with any "
            "combination)."
        ),
    ] = None,
    target_threshold: Annotated[
        float | None, typer.Option(help="normsim: keep rows whose NormSim is at least this.")
    ] = None,
    target_clusters: Annotated[
        int | None,
        typer.Option(help="clusters: k of the k-means (default: the square root of its sample)."),
    ] = None,
    task_index: Annotated[
        int | None,
        typer.Option(
            help="Array task I of --num-tasks: select from this task's partition (a hash of "
            "each row's uid, else part and key). Default: from Slurm's array variables, else "
            "one task; --num-tasks 1 alone selects over every row whatever Slurm says."
        ),
    ] = None,
    num_tasks: NumTasks = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Only join the finished array tasks' selections into OUT (the last task to "
            "finish also does this by itself).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the selection OUT holds (its manifest, summary, uids, tasks and "
            "exported shards) instead of refusing a different one. Not for array tasks.",
        ),
    ] = False,
    ledger: Annotated[
        bool,
        typer.Option(
            "--ledger",
            help="Also write OUT/ledger/ (one Parquet file per score-set part): every row's "
            "fate (kept, error, filtered, duplicate, excluded, not chosen, tail) and why, for "
            "`info OUT --why KEY` and DuckDB. As array tasks, give it to every task: the merge "
            "writes it (or, with --spread-ledger, the tasks run again after it).",
        ),
    ] = False,
    spread_ledger: Annotated[
        bool,
        typer.Option(
            "--spread-ledger",
            help="With --ledger as array tasks: the merge leaves the ledger's parts to the "
            "tasks; run every task again after it (select --task-index I --num-tasks N --ledger) "
            "and each writes the parts I, I+N, ... (`slurm select` and `local` do this).",
        ),
    ] = False,
) -> None:
    """Choose training batches from score sets and write OUT/manifest.parquet (one row per kept
    sample: step, position, shard, key, index, uid, scores), OUT/summary.json and OUT/uids.npy
    (DataComp's subset format) when every kept row has a uid. Same inputs and seed give
    byte-identical files.

    As array task I of N, it selects from its own partition into OUT/tasks/ and the last task
    to finish merges them (their batches interleaved into one step order); with --export each
    task then writes its share of the exported shards."""
    options = dict(locals())
    from jestcurate.math.sampling import SamplerOptions
    from jestcurate.pipelines import select as select_mod
    from jestcurate.pipelines.select.filters import FilterOptions

    codes = tuple(c for given in language or () for c in given.split(","))
    cfg = config_from(
        select_mod.SelectConfig,
        options,
        reference=score_set_dir(reference),
        learner=score_set_dir(learner) if learner else None,
        sampling=config_from(SamplerOptions, options, criterion=score),
        exclude=tuple(exclude or ()),
        filters=config_from(FilterOptions, options, language=codes),
    )
    select_mod.print_exported(select_mod.run(cfg, on_selected=select_mod.print_selected))


@slurm_app.command(
    "select",
    short_help="Write (and submit) sbatch scripts for select as array tasks, then the merge.",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
@one_line_errors
def slurm_select(
    ctx: typer.Context,
    num_tasks: Annotated[
        int, typer.Option(help="Array tasks; each selects from about 1/N of the rows.")
    ],
    partition: SlurmPartition = None,
    gpus_per_task: Annotated[int, typer.Option(help="GPUs per task (0: CPU select).")] = 0,
    cpus_per_task: Annotated[int, typer.Option(help="CPU cores per task.")] = 8,
    mem: SlurmMem = None,
    time: SlurmTime = "24:00:00",
    max_concurrent: SlurmMaxConcurrent = None,
    account: SlurmAccount = None,
    qos: SlurmQos = None,
    max_array_size: SlurmMaxArraySize = None,
    sbatch: SlurmExtra = None,
    submit: SlurmSubmit = False,
    retry: Annotated[
        bool,
        typer.Option(
            "--retry",
            help="Submit only what is unfinished (each task's round 1 and 2, the merge, the "
            "ledger's parts, the export), e.g. after a cancelled or failed task ended the chain.",
        ),
    ] = False,
) -> None:
    """Write OUT/slurm/select.sbatch (an array run twice: in round 1 task I buckets the rows
    of its 1/N of the parts by row hash, in round 2 it selects from its partition),
    select-merge.sbatch (one job after round 2, joining the tasks into OUT) and, when the
    select options include --export, select-export.sbatch (an array after the merge: task I
    writes its share of the shards) and, with --ledger, select-ledger.sbatch (an array after
    the merge: task I writes the ledger parts I mod N; the tasks get --spread-ledger). With
    --submit, submit them in that order with afterok
    dependencies. Every step is safe to requeue or rerun.

    The select options follow `--`, exactly as `select` takes them: jestcurate slurm select
    --num-tasks 64 --submit -- scores/ --learner learner/ --out curated/"""
    options = dict(locals())
    from jestcurate.scale import slurm
    from jestcurate.scale import slurm_select as slurm_select_mod

    extra = tuple(sbatch or ())
    opts = config_from(slurm.SlurmOptions, options, extra=extra, job_name="jestcurate-select")
    plan = slurm_select_mod.plan(ctx.args, num_tasks, functools.partial(command_options, "select"))
    written = slurm_select_mod.print_scripts
    unfinished = None
    if retry:
        from jestcurate.pipelines.select import unfinished_rounds

        unfinished = unfinished_rounds(plan.out, plan.num_tasks, plan.export, plan.ledger)
    report = slurm_select_mod.run(plan, opts, submit or retry, written=written, retry=unfinished)
    slurm_select_mod.print_report(report)


@app.command(short_help="Find exact and near-duplicate samples (SemDeDup with faiss).")
@one_line_errors
def dedup(
    scores: Annotated[
        str, typer.Argument(help="Score set to deduplicate (path or URL).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for dedup.parquet.")],
    eps: Annotated[
        float,
        typer.Option(
            help="Drop rows with cosine similarity above 1 - eps to a better row. When most rows "
            "go, dedup warns that the embedding space looks collapsed and suggests an eps."
        ),
    ] = 0.05,
    clusters: Annotated[
        int | None, typer.Option(help="k-means clusters (default: the square root of the rows).")
    ] = None,
    by: Annotated[
        str,
        typer.Option(
            help="image, text or both embeddings. image by default: templated captions make "
            "text duplicates far commoner than duplicate pairs."
        ),
    ] = "image",
    seed: Annotated[int, typer.Option(help="Seed of the k-means sample and initialisation.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda, for faiss k-means.")] = "auto",
    neighbors: Annotated[
        int,
        typer.Option(
            help="Compare each row with the rows of its N nearest clusters, not only its own: "
            "finds pairs that k-means split, at about N times the work."
        ),
    ] = 1,
) -> None:
    """Find exact duplicates (same image bytes) and near-duplicates (SemDeDup: spherical k-means
    with faiss, then cosine > 1 - eps within each cluster); keep the best of each group by
    clip_score. Writes OUT/dedup.parquet (shard, key, index, cluster, kept, duplicate_of,
    duplicate_of_shard, similarity, reason) for `select --dedup OUT`."""
    from jestcurate.pipelines import dedup as dedup_mod

    cfg = config_from(dedup_mod.DedupConfig, locals(), scores=score_set_dir(scores))
    done = dedup_mod.run(cfg)
    dedup_mod.print_summary(done, out)


@app.command(short_help="Find the pool's near copies of evaluation images (faiss), to exclude.")
@one_line_errors
def decontaminate(
    scores: Annotated[
        str, typer.Argument(help="The pool's score set (path or URL).", show_default=False)
    ],
    against: Annotated[
        list[str],
        typer.Option(
            help="An evaluation set (repeatable): a score set made by `score` with the pool's "
            "model and checkpoint, or its WebDataset tars (a folder, clip_benchmark's with its "
            "test/ folder, a pattern or a list), embedded with the model the pool's meta.json "
            "records.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for decontam.parquet.")],
    threshold: Annotated[
        float,
        typer.Option(
            help="A pool row is a near copy when its image's cosine to an evaluation image, or "
            "the mean of its image's and caption's cosines to an evaluation pair, is at least "
            "this. For a trained CLIP; a collapsed space (tiny or untrained model) gets a "
            "warning with a suggested threshold."
        ),
    ] = 0.95,
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda: faiss's search, and the model for tars.")
    ] = "auto",
    batch_size: Annotated[
        int | None,
        typer.Option(help="Images per model batch when embedding tars (256 on CUDA, 64 on a CPU)."),
    ] = None,
) -> None:
    """Compare every ok row of the pool with each evaluation set's images (exact cosines, faiss)
    and write OUT/decontam.parquet (one row per near copy: shard, part, key, index, match,
    cosine, the evaluation set and key it copies) and OUT/summary.json (counts and examples per
    set) for `select --exclude OUT`."""
    from jestcurate.pipelines import decontam

    cfg = config_from(
        decontam.DecontamConfig, locals(), scores=score_set_dir(scores), against=tuple(against)
    )
    done = decontam.run(cfg)
    decontam.print_summary(done, out)
