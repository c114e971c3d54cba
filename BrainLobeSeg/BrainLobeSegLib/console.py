"""What the command-line front ends share: help texts that show defaults, quiet exit on
a closed pipe, and how much they print (``--quiet`` / ``--verbose``).

Used by ``brainlobeseg`` (:mod:`cli`) and ``python -m training``, so both behave alike.
Only the standard library is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import Callable, Iterator

#: Exit status after the reader of stdout went away (``brainlobeseg models | head -1``):
#: 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe.
EXIT_CLOSED_PIPE = 141


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults-showing formatter, minus the noise: ``(default: None)`` and
    ``(default: False)`` of unset options and switches say nothing, and a help text that
    already states its default is left as it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text
                or "default" in text.lower() or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def quiet_on_closed_pipe(main: Callable[[], int]) -> int:
    """Run a command's ``main``; if stdout (or stderr) was closed by the reader, stop
    without a traceback or an "internal error" line and return :data:`EXIT_CLOSED_PIPE`.

    Python raises ``BrokenPipeError`` on the next write (and once more when it flushes
    stdout at exit); pointing both streams at ``os.devnull`` silences that last flush.
    """
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(devnull, stream.fileno())
        return EXIT_CLOSED_PIPE


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` on a sub-command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="print only warnings and errors (no progress bar, no per-case lines)")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="also print the models used and the time of each step")


@contextlib.contextmanager
def quiet_stdout(enabled: bool) -> Iterator[None]:
    """While ``enabled``, what a command prints to stdout is dropped (warnings and errors go
    to stderr and stay)."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
