"""The `jestcurate` command line. Each command turns its options into a config and calls run();
expected errors print one line and exit 2, failed shards exit 1."""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from jestcurate import __version__, errors
from jestcurate.errors import NO_SPACE, NO_SPACE_TEXT, JCError, Terminated, no_space

app = typer.Typer(
    name="jestcurate",
    help="Offline JEST data curation for image-text corpora stored as WebDataset shards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
log = logging.getLogger("jestcurate")
F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")


VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")]


def _one_line_errors(func: F) -> F:
    """Wrap a command: expected errors as one line with their exit status, and -v/--verbose
    taken after the command's name as well as before it."""

    @functools.wraps(func)
    def wrapper(*args: Any, verbose: bool = False, **kwargs: Any) -> Any:
        from jestcurate import ui

        if verbose:
            ui.setup_logging(True)
        try:
            return func(*args, **kwargs)
        except JCError as exc:
            _error(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            ui.stderr.print("interrupted; rerun the same command to resume", highlight=False)
            raise typer.Exit(130) from None
        except Terminated:
            ui.stderr.print("terminated (SIGTERM); rerun the same command to resume")
            raise typer.Exit(143) from None
        except OSError as exc:
            # a worker process's error arrives re-raised without its errno, by its message
            if exc.errno not in NO_SPACE and not any(m in str(exc) for m in NO_SPACE_TEXT):
                raise
            _error(str(no_space(exc)))
            raise typer.Exit(2) from None
        except Exception:
            if errors.terminating:  # e.g. a decoding worker the same SIGTERM ended
                ui.stderr.print("terminated (SIGTERM); rerun the same command to resume")
                raise typer.Exit(143) from None
            raise

    # typer reads the options from the signature: the command's own, then --verbose
    signature = inspect.signature(func, eval_str=True)
    verbose = inspect.Parameter(
        "verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOption
    )
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), verbose]
    )
    wrapper.__annotations__ = {**func.__annotations__, "verbose": VerboseOption}
    return wrapper  # type: ignore[return-value]


def _error(message: str) -> None:
    """The one line every expected error prints, usage errors included."""
    from rich.markup import escape

    from jestcurate import ui

    ui.stderr.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _flags_take_no_value() -> None:
    """typer's help shows a flag's type (`--export <bool>`) as if it took a value; it takes
    none, so its type column stays empty."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_jestcurate", False):
        return  # a typer that shows no types, or patched already

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich._jestcurate = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"jestcurate {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: VerboseOption = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    from jestcurate import ui

    ui.setup_logging(verbose)


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


def _score_out(out: str) -> tuple[Path, str | None]:
    """(local folder, the URL it mirrors or None) for score's --out."""
    from jestcurate.io.remote import Mirror, is_url

    if is_url(out):
        return Mirror(out).local, out
    return Path(out.removeprefix("file://")), None


def _score_set(location: str) -> Path:
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


def _config(cls: type[C], given: dict[str, Any], **fixed: Any) -> C:
    """A command's config: each of its options named like a field of `cls`, then `fixed`."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in given.items() if k in names and k not in fixed}, **fixed)


@app.command(short_help="Score shards with a frozen open_clip model into a Parquet score set.")
@_one_line_errors
def score(
    inputs: Inputs,
    out: ScoreOut,
    model: Model,
    pretrained: Pretrained = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    precision: Precision = None,
    workers: Workers = None,
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
    role: Role = "reference",
    decode: Decode = "auto",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check each finished part's sha256 against its marker (the size is always "
            "checked); a part that does not match is scored again.",
        ),
    ] = False,
) -> None:
    """Score shards with a frozen open_clip model: embeddings, clip_score and ref_loss per sample,
    one Parquet part per shard under OUT/parts. Rerunning skips finished shards and retries
    failed ones; array tasks split the shards between them. Runs sharing OUT (overlapping cron
    runs) claim shards, never score one twice, and each exits once every shard is settled.

    Exit status: 0 all shards ok, 1 some shards failed (the rest are written), 2 bad input."""
    given = dict(locals())
    from jestcurate.pipelines.score.cpu import sleeping_openmp

    sleeping_openmp(device, workers)  # before torch loads
    from jestcurate.pipelines import score as score_mod

    local, url = _score_out(out)
    cfg = _config(score_mod.ScoreConfig, given, inputs=tuple(inputs), out=local, upload_to=url)
    with score_mod.ScoreProgress() as progress:
        report = score_mod.run(cfg, progress)
    score_mod.print_summary(report)
    if report.failed:
        raise typer.Exit(1)


slurm_app = typer.Typer(
    help="Run under Slurm: write (and submit) sbatch array scripts.", no_args_is_help=True
)
app.add_typer(slurm_app, name="slurm")


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


@slurm_app.command("score", short_help="Write (and submit) an sbatch array script for score.")
@_one_line_errors
def slurm_score(
    inputs: Inputs,
    out: ScoreOut,
    model: Model,
    pretrained: Pretrained = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    precision: Precision = None,
    workers: Workers = None,
    role: Role = "reference",
    decode: Decode = "auto",
    num_tasks: Annotated[
        int | None, typer.Option(help="Array tasks (default: shards / --shards-per-task).")
    ] = None,
    shards_per_task: Annotated[
        int, typer.Option(help="Shards per task when --num-tasks is not given.")
    ] = 16,
    partition: SlurmPartition = None,
    gpus_per_task: Annotated[int, typer.Option(help="GPUs per task (0: none).")] = 1,
    cpus_per_task: Annotated[int, typer.Option(help="CPU cores per task (decoding).")] = 8,
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
            help="Resubmit only the tasks whose shards are not all done (same plan as before).",
        ),
    ] = False,
) -> None:
    """Write OUT/slurm/score.sbatch, an array job running `jestcurate score` per task, and print
    its path; with --submit, submit it (as several array jobs if the tasks pass the cluster's
    MaxArraySize). Tasks requeue safely after node failures; --retry resubmits only the tasks
    that still have shards to do."""
    given = dict(locals())
    from jestcurate import ui
    from jestcurate.scale import slurm

    local, url = _score_out(out)
    opts = _config(slurm.SlurmOptions, given, extra=tuple(sbatch or ()))
    fixed = {"inputs": tuple(inputs), "out": local, "upload_to": url, "slurm": opts}
    cfg = _config(slurm.ScoreArrayConfig, given, **fixed)
    array = slurm.score_array(cfg, written=ui.say)
    slurm.print_score_array(array)


@slurm_app.command(
    "select",
    short_help="Write (and submit) sbatch scripts for select as array tasks, then the merge.",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
@_one_line_errors
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
) -> None:
    """Write OUT/slurm/select.sbatch (an array run twice: in round 1 task I buckets the rows
    of its 1/N of the parts by row hash, in round 2 it selects from its partition),
    select-merge.sbatch (one job after round 2, joining the tasks into OUT) and, when the
    select options include --export, select-export.sbatch (an array after the merge: task I
    writes its share of the shards). With --submit, submit them in that order with afterok
    dependencies. Every step is safe to requeue or rerun.

    The select options follow `--`, exactly as `select` takes them: jestcurate slurm select
    --num-tasks 64 --submit -- scores/ --learner learner/ --out curated/"""
    options = dict(locals())
    from jestcurate.scale import slurm
    from jestcurate.scale import slurm_select as slurm_select_mod

    extra = tuple(sbatch or ())
    opts = _config(slurm.SlurmOptions, options, extra=extra, job_name="jestcurate-select")
    plan = slurm_select_mod.plan(ctx.args, num_tasks, _select_options)
    slurm_select_mod.print_report(slurm_select_mod.run(plan, opts, submit))


def _select_options(args: list[str]) -> dict[str, Any]:
    """select's options, parsed as `select` parses them; bad ones are one JCError."""
    command = typer.main.get_command(app)
    try:
        return command.commands["select"].make_context("select", list(args)).params
    except typer.TyperException as exc:  # typer's own click: usage errors derive from this
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise JCError(f"select options: {message}") from None


@app.command(
    name="import", short_help="Make a score set from embeddings you already have (DataComp, ...)."
)
@_one_line_errors
def import_(
    source: Annotated[
        Path,
        typer.Argument(
            help="datacomp: a pool folder of NAME.parquet + NAME.npz; clip-retrieval: the "
            "inference output folder (img_emb/, text_emb/, metadata/)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The score set to write.")],
    format: Annotated[str, typer.Option("--format", help="datacomp or clip-retrieval.")],
    model: Model,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="open_clip tag or checkpoint of the model that made the embeddings (its logit "
            "scale and bias are read from it), or a label when --logit-scale is given."
        ),
    ] = None,
    embeddings: Annotated[
        str, typer.Option(help="datacomp: l14 (ViT-L/14) or b32 (ViT-B/32) arrays.")
    ] = "l14",
    role: Role = "reference",
    logit_scale: Annotated[
        float | None,
        typer.Option(
            help="α = exp(logit_scale) of the model, when its weights are not at hand "
            "(OpenAI's CLIP: 100). Then no model is loaded."
        ),
    ] = None,
    logit_bias: Annotated[
        float | None, typer.Option(help="With --logit-scale: a SigLIP model's logit bias.")
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(help="With --logit-scale: softmax or sigmoid (default: sigmoid with a bias)."),
    ] = None,
    task_index: TaskIndex = None,
    num_tasks: NumTasks = None,
    shards: Annotated[
        list[str] | None,
        typer.Option(
            "--shards",
            help="The downloaded WebDataset shards (paths, globs, {a..b} or @list.txt, as score "
            "takes them): one part per shard, a row per sample, its embeddings found by uid "
            "(img2dataset's sidecar SHARD.parquet, else the samples' json).",
        ),
    ] = None,
) -> None:
    """Turn embeddings that already exist into a score set (meta.json, parts/, done/), so
    select, dedup, info, report and status work on it without running a model: re-normalised,
    stored as float16, clip_score and ref_loss computed as `score` computes them. Without
    --shards, one part per source file and no images: commands that need them (select
    --export, the loaders, report thumbnails) say so. With --shards, one part per downloaded
    shard, so export and the loaders read the samples; source rows never downloaded are
    counted. Rerunning skips finished parts; array tasks split them.

    Exit status: 0 all files imported, 1 some failed (the rest are written), 2 bad input."""
    from jestcurate.pipelines import importer

    cfg = _config(importer.ImportConfig, locals(), shards=tuple(shards or ()))
    report = importer.run(cfg)
    importer.print_summary(report)
    if report.failed:
        raise typer.Exit(1)


@app.command(short_help="Done, failed, running and pending shards of a score set or an export.")
@_one_line_errors
def status(
    path: Annotated[
        str, typer.Argument(help="A score set (path or URL) or a selection with an export.")
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="The score run's INPUTS, to list the shards still pending."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 unless everything is done.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Compare each part's sha256 with its marker, not only its size."
        ),
    ] = False,
) -> None:
    """Done, failed (with reasons), damaged, running and, given the INPUTS, pending shards of a
    score set; or written and missing shards of an export."""
    import json as json_mod

    from jestcurate import ui
    from jestcurate.scale import status as status_mod

    found, complete = status_mod.read_status(path, inputs or (), full=verify)
    if json_out:
        ui.stdout.print_json(json_mod.dumps(found))
    else:
        status_mod.print_status(found)
    if check and not complete:
        raise typer.Exit(1)


@app.command(short_help="Check a score set, selection or dedup output against its records.")
@_one_line_errors
def verify(
    path: Annotated[
        str,
        typer.Argument(
            help="A score set (a path or a URL), a selection (and its export) or a dedup output."
        ),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every file against its marker (score sets: size and sha256 of each part; parts
    with no marker, markers with no part) or against the sizes and hashes in summary.json and
    shards/export.json, and list what is damaged, missing or orphaned. Changes nothing. A score
    set at a URL is checked where it is: its parts are streamed, not stored.

    Exit status: 0 intact, 1 problems found, 2 not something jestcurate wrote."""
    import json as json_mod

    from jestcurate import ui
    from jestcurate.pipelines import verify as verify_mod

    found = verify_mod.verify(path)
    if json_out:
        ui.stdout.print_json(json_mod.dumps(found))
    else:
        verify_mod.print_report(found)
    if found["problems"]:
        raise typer.Exit(1)


@app.command(short_help="Choose JEST (or baseline) training batches from score sets.")
@_one_line_errors
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
    balance_clusters: Annotated[
        bool,
        typer.Option(
            "--balance-clusters",
            help="With --dedup: no cluster takes more than twice its even share of any batch "
            "(of the kept set for random and clip-score).",
        ),
    ] = False,
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

    cfg = _config(
        select_mod.SelectConfig,
        options,
        reference=_score_set(reference),
        learner=_score_set(learner) if learner else None,
        sampling=_config(SamplerOptions, options, criterion=score),
    )
    select_mod.print_report(select_mod.run(cfg))


C = TypeVar("C")


def _config(cls: type[C], options: dict[str, Any], **given: Any) -> C:
    """A config dataclass from a command's options, matched by field name; `given` sets the
    fields whose option has another name or needs converting."""
    from dataclasses import fields

    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{**{k: v for k, v in options.items() if k in names}, **given})


@app.command(short_help="Find exact and near-duplicate samples (SemDeDup with faiss).")
@_one_line_errors
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

    cfg = _config(dedup_mod.DedupConfig, locals(), scores=_score_set(scores))
    done = dedup_mod.run(cfg)
    dedup_mod.print_summary(done, out)


@app.command(short_help="Write a self-contained HTML report of a score set (and a selection).")
@_one_line_errors
def report(
    scores: Annotated[
        str, typer.Argument(help="Score set to report on (path or URL).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path(
        "report.html"
    ),
    selection: Annotated[
        Path | None,
        typer.Option(help="A selection made from this score set: show kept vs dropped."),
    ] = None,
    thumbnails: Annotated[
        int, typer.Option(help="Thumbnails per grid (highest, lowest, random).")
    ] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the random grids.")] = 0,
) -> None:
    """Write one self-contained HTML page (opens from disk, no network): counts per shard and
    status, errors by reason, score histograms (kept vs dropped with --selection) and thumbnail
    grids with captions and scores, read back from the source shards."""
    from jestcurate.pipelines import report as report_mod

    done = report_mod.write_report(_score_set(scores), out, selection, thumbnails, seed)
    report_mod.print_written(done, out)


@app.command(short_help="Summarise a score set, a selection or a dedup output.")
@_one_line_errors
def info(
    path: Annotated[
        str,
        typer.Argument(
            help="A score set (path or URL), a selection or a dedup output.", show_default=False
        ),
    ],
) -> None:
    """Summarise a score set (model, counts, errors, score quantiles, shard states), a
    selection (method, parameters, counts, mean scores kept vs dropped, export) or a dedup
    output (parameters, clusters used, kept and dropped counts, cluster sizes, nearest-neighbour
    cosine and any collapsed-space warning)."""
    from jestcurate.pipelines import report as report_mod

    folder = _score_set(path)
    report_mod.print_info(path, report_mod.describe(folder))


C = TypeVar("C")


def _config(cls: type[C], options: dict[str, Any], **converted: Any) -> C:
    """A pipeline's config from a command's options: each field of `cls` takes the option of
    the same name (typer's parameters are named as the config's fields), or its value in
    `converted` where the option needs converting first; fields no option names keep their
    defaults. `options` is the command's locals(), taken before it assigns any name a field
    has (the imports above it name modules, which no field is named as)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(converted) - fields
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    return cls(**{k: v for k, v in {**options, **converted}.items() if k in fields})


@app.command(short_help="Train an open_clip reference or proxy learner into a checkpoint.")
@_one_line_errors
def train(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Training shards, as for score: a clean guide set for a reference, a slice "
            "of the raw pool for a proxy learner.",
            show_default=False,
        ),
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="open_clip model name or model-config .json.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoint to write (CKPT; CKPT.json beside it).")
    ],
    pretrained: Annotated[
        str | None,
        typer.Option(help="Start from this open_clip tag or checkpoint (default: from scratch)."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps to train.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the inputs (or --steps).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 1e-3,
    warmup: Annotated[int, typer.Option(help="Warm-up steps (at most a fifth of the run).")] = 20,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[
        str | None, typer.Option(help="fp32, bf16 or fp16 autocast (default fp32 CPU, bf16 CUDA).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the data order.")] = 0,
    save_every: Annotated[int, typer.Option(help="Save resume state every N steps.")] = 100,
) -> None:
    """Train an open_clip model contrastively (its own loss: CLIP softmax, or SigLIP sigmoid for
    models with a logit bias) and write a checkpoint that `score --pretrained` and open_clip
    load. Rerunning continues from the last saved step; a finished run is not redone."""
    from jestcurate import ui
    from jestcurate.pipelines import train as train_mod

    cfg = _config(train_mod.TrainConfig, locals(), inputs=tuple(inputs))
    with ui.training_progress() as on_step:
        report = train_mod.run(cfg, on_step)
    train_mod.print_summary(report)


@app.command(short_help="Run the whole JEST loop offline on a built-in synthetic corpus.")
@_one_line_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for everything the demo makes.")
    ] = (Path("demo")),
    size: Annotated[
        str, typer.Option(help="small (about 2 minutes on 2 CPU cores) or medium (about 10).")
    ] = "small",
) -> None:
    """Run the whole JEST loop offline on a synthetic corpus: generate a guide split and a noisy
    pool, train a tiny reference and a proxy learner, score the pool with both, select with jest
    (learnability) and random, export both, and show which noise each kept."""
    from jestcurate import ui
    from jestcurate.pipelines import demo as demo_mod
    from jestcurate.pipelines.score import ScoreProgress

    if size not in demo_mod.SIZES:
        raise JCError(f"unknown size {size!r}; use {', '.join(demo_mod.SIZES)}")
    report = demo_mod.run(out, demo_mod.SIZES[size], ui.training_progress, ScoreProgress)
    demo_mod.print_summary(report)


@app.command(short_help="Write a synthetic img2dataset-style corpus.")
@_one_line_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write NNNNN.tar shards into.")],
    shards: Annotated[int, typer.Option(help="Number of shards.")] = 4,
    samples: Annotated[int, typer.Option(help="Samples per shard.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same samples.")] = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 96,
    noise: Annotated[
        str, typer.Option(help="clean, or noisy (mismatched, junk, blank, duplicate pairs).")
    ] = "clean",
    first_shard: Annotated[int, typer.Option(help="Number of the first shard.")] = 0,
) -> None:
    """Write a synthetic img2dataset-style corpus (coloured shapes with captions) for trying
    jestcurate without downloads. Each sample's .json records its noise kind and true class."""
    from jestcurate.pipelines import synth as synth_mod

    if noise not in synth_mod.PRESETS:
        raise JCError(f"unknown noise preset {noise!r}; use {', '.join(synth_mod.PRESETS)}")
    if shards < 1 or samples < 1 or image_size < 8:
        raise JCError("--shards and --samples must be at least 1, --image-size at least 8")
    noise_mix = synth_mod.PRESETS[noise]
    spec = synth_mod.CorpusSpec(shards, samples, seed, image_size, noise_mix, first_shard)
    paths = synth_mod.write_corpus(out, spec)
    typer.echo(f"wrote {len(paths)} shards of {samples} samples to {out}")


def _click_errors() -> Any:
    """The exceptions module of the click that typer runs on: its own copy in recent typer."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer before it vendored click
        from click import exceptions
    return exceptions


def main() -> None:
    errors.handle_sigterm()  # Slurm's scancel and preemption: clean up and exit 143
    click_errors = _click_errors()
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="jestcurate", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:  # a bare command: its help, as click shows it
        help_text = exc.format_message()  # empty where typer's rich help printed itself
        if help_text.strip():
            typer.echo(help_text, err=True)
        code = exc.exit_code
    except click_errors.UsageError as exc:  # a wrong option or argument: one line, as errors are
        where = exc.ctx.command_path if exc.ctx else "jestcurate"
        _error(f"{exc.format_message()} (see '{where} --help')")
        code = exc.exit_code
    except click_errors.ClickException as exc:
        _error(exc.format_message())
        code = exc.exit_code
    except typer.Abort:
        code = 130
    finally:
        # Interpreter shutdown collects every object still tracked, and importing torch and
        # open_clip leaves ~400k of them: 1.5 s at each exit on a 2-core VM. Frozen ones are
        # skipped; nothing is left unwritten (every file is closed, renamed, fsynced by now).
        gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)
