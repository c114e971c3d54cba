"""Errors the user can act on.

Every failure caused by input (a file, a transform, a model folder, an option) is raised
as an :class:`InputError` whose text says what is wrong and what to do. Front ends
(CLI, Slicer) print that text alone, never a traceback, and the CLI exits with
:data:`EXIT_INPUT_ERROR`.
"""

from __future__ import annotations

import errno
import os

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


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


def from_os_error(exc: OSError, where: str = "") -> InputError:
    """The one line for a failed file operation: the disk, permissions and paths are
    the user's to fix, so each gets its own advice (free space is no answer to a
    read-only folder). ``where`` names the file or folder when ``exc`` does not."""
    path = str(exc.filename or where or "the output")
    folder = where or os.path.dirname(os.path.abspath(path))
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in _NO_SPACE:
        return InputError(f"no space left on {folder} ({reason}); nothing was written.",
                          "Free some space, or choose another output folder with -o.")
    if exc.errno in _NO_PERMISSION:
        return InputError(f"cannot write to {path} ({reason}); nothing was written.",
                          "Choose a folder you can write to with -o, or fix its permissions.")
    if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP):
        return InputError(f"{path}: {reason}; nothing was written.", "Check the path.")
    return InputError(f"cannot use {path} ({reason}).", "Check the path and the disk.")
