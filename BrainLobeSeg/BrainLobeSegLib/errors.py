"""Errors the user can act on.

Every failure caused by input (a file, a transform, a model folder, an option) is raised
as an :class:`InputError` whose text says what is wrong and what to do. Front ends
(CLI, Slicer) print that text alone, never a traceback, and the CLI exits with
:data:`EXIT_INPUT_ERROR`.
"""

from __future__ import annotations

EXIT_INPUT_ERROR = 2


class BrainLobeSegError(Exception):
    """Base class of the errors this package raises on purpose."""


class InputError(BrainLobeSegError):
    """A file, transform, model or option is unusable.

    ``problem`` says what is wrong, ``hint`` what the user can do about it.
    """

    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem} {hint}".strip())


class ModelError(InputError):
    """A model folder is missing, tampered with, or does not match this engine."""


class InputWarning(UserWarning):
    """The input is usable but was corrected or looks unusual; front ends show the
    message as one warning line (the CLI after the command, the panel in its status)."""


class Cancelled(BrainLobeSegError):
    """The user pressed Cancel (or the cancel flag was set); nothing was written."""
