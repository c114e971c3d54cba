"""Long computations as sequences of short steps (generators), and how to run them.

Inside 3D Slicer the main thread holds Python's GIL whenever the Qt event loop idles
(PythonQt is built without thread support), so a Python worker thread only advances in
the moments the GUI runs Python and a long run in a thread crawls. The engine therefore
writes its long work as generators: each ``next()`` does one short step (well under a
second on a laptop) and returns, and the caller decides what happens between steps.

- The command line and the tests run the steps in a plain loop (:func:`run_steps`).
- The Slicer panel runs one step per ``QTimer`` tick on the main thread (see
  ``slicer_logic.SteppedRun``), updating the progress bar and honouring Cancel
  between steps; closing the generator (``close()``) cancels it cleanly.

A step generator yields ``None`` and returns its result (``return value`` in the
generator, ``yield from`` to call one from another). Only the standard library is used,
so every engine module can import this one.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, TypeVar

T = TypeVar("T")

#: A computation in steps: yields ``None`` between steps, returns ``T`` at the end.
Steps = Generator[None, None, T]


def run_steps(steps: "Steps[T]") -> T:
    """Run every step in a plain loop and return the result (CLI, tests, scripts)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def within(context: Callable[[], Any], steps: "Steps[T]") -> "Steps[T]":
    """``steps`` with each of its steps run inside ``context()`` (a fresh context manager
    per step), so a mode such as ``torch.inference_mode`` is on while the steps compute
    but never leaks into the caller's code between steps."""
    try:
        while True:
            with context():
                try:
                    next(steps)
                except StopIteration as done:
                    return done.value
            yield
    finally:
        steps.close()   # cancelled between steps: the inner steps clean up too
