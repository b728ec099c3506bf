"""The typer app every command registers with: one-line errors and their exit codes, -v
after a command, the help's flags, options matched to config fields, the entry point."""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import logging
import sys
from collections.abc import Callable
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


def one_line_errors(func: F) -> F:
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
            print_error(str(exc))
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
            print_error(str(no_space(exc)))
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


def print_error(message: str) -> None:
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


slurm_app = typer.Typer(
    help="Run under Slurm: write (and submit) sbatch array scripts.", no_args_is_help=True
)

app.add_typer(slurm_app, name="slurm")


def config_from(cls: type[C], options: dict[str, Any], **converted: Any) -> C:
    """A pipeline's config from a command's options: each field of `cls` takes the option of
    the same name (typer's parameters are named as the config's fields), or its value in
    `converted` where the option needs converting first; fields no option names keep their
    defaults. `options` is the command's locals(), taken before it assigns any name a field
    has (the imports above it name modules, which no field is named as)."""

    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(converted) - fields
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    return cls(**{k: v for k, v in {**options, **converted}.items() if k in fields})


def command_options(name: str, args: list[str]) -> dict[str, Any]:
    """A command's options parsed as the command parses them (for the commands that run
    another command's options in tasks: slurm select, local); bad ones are one JCError."""
    command = typer.main.get_command(app)
    try:
        return command.commands[name].make_context(name, list(args)).params  # type: ignore[attr-defined]
    except typer.TyperException as exc:  # typer's own click: usage errors derive from this
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise JCError(f"{name} options: {message}") from None


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
        print_error(f"{exc.format_message()} (see '{where} --help')")
        code = exc.exit_code
    except click_errors.ClickException as exc:
        print_error(exc.format_message())
        code = exc.exit_code
    except typer.Abort:
        code = 130
    finally:
        # Interpreter shutdown collects every object still tracked, and importing torch and
        # open_clip leaves ~400k of them: 1.5 s at each exit on a 2-core VM. Frozen ones are
        # skipped; nothing is left unwritten (every file is closed, renamed, fsynced by now).
        gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)
