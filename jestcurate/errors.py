"""Errors that reach the user as one line, never as a traceback."""

from __future__ import annotations

import errno
import signal
from typing import Any


class JCError(Exception):
    """Bad input or an impossible request: the CLI prints the message and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """An exception's first non-blank line (library messages run to many), else its type; with
    the next line too when the first only announces it (torch's "Error(s) in loading
    state_dict for CLIP:")."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def some(items: list[str], shown: int = 3, sep: str = "; ") -> str:
    """The first few of a list for a one-line message, and how many more there are."""
    more = f"{sep}and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


class Terminated(BaseException):
    """SIGTERM arrived (Slurm's scancel, preemption, a time limit): unwind, cleaning up as for
    Ctrl-C, and exit 143. A BaseException, so `except Exception` blocks do not swallow it."""


# Set once a termination signal arrived: an error raised while unwinding from it (a decoding
# worker that the same signal ended, say) is part of the termination, not a new failure.
terminating = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global terminating
    if not terminating:
        terminating = True
        raise Terminated(signum)


def handle_sigterm() -> None:
    """Turn SIGTERM into Terminated in this (main) process."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def default_sigterm() -> None:
    """In worker processes: die at once on SIGTERM; the main process does the cleaning up."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def no_space(exc: OSError, path: object | None = None) -> JCError:
    """The one line for a full disk or an exhausted quota."""
    where = path or exc.filename or "the output"
    what = "quota exhausted" if exc.errno == errno.EDQUOT else "no space left on the device"
    return JCError(
        f"{what} writing {where}: free space (or raise the quota) and rerun the same command; "
        "finished files are kept and nothing partial is left"
    )
