"""What the command-line front ends share: help texts that show defaults, quiet exit on
a closed pipe, how much they print (``--quiet`` / ``--verbose``), and warnings that are
both printed and kept for the results they concern.

Used by ``brainlobeseg`` (:mod:`cli`) and ``python -m training``, so both behave alike.
Only the standard library (and :mod:`errors`) is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from typing import Callable, Iterator, List

from .errors import InputWarning

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


def use_help_formatter(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and all its sub-commands :class:`HelpFormatter` (argparse does not
    pass a parser's formatter on to the sub-parsers it makes)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_help_formatter(sub)
    return parser


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


class CaseWarnings:
    """The :class:`InputWarning` messages raised while one case (or one model load) was
    processed; ``messages`` grows while the block runs, so results written inside it can
    record them."""

    def __init__(self, caught: list) -> None:
        self._caught = caught

    @property
    def messages(self) -> List[str]:
        return [str(w.message) for w in self._caught if issubclass(w.category, InputWarning)]


@contextlib.contextmanager
def case_warnings(label: str = "", prog: str = "brainlobeseg") -> Iterator[CaseWarnings]:
    """Collect the input warnings of a block and print each as one line on stderr when the
    block ends (``prog: warning: label: message``), whether it succeeded or not.

    Other warnings are passed on unchanged. Used per case so that a batch run says which
    case a warning is about, and so that the case's outputs can record it.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        log = CaseWarnings(caught)
        try:
            yield log
        finally:
            others = [w for w in caught if not issubclass(w.category, InputWarning)]
    for message in log.messages:
        print(f"{prog}: warning: {label + ': ' if label else ''}{message}", file=sys.stderr)
    for w in others:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
