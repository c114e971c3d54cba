"""Long computations as sequences of short steps (generators), and how to run them.

Inside 3D Slicer the main thread holds Python's GIL whenever the Qt event loop idles
(PythonQt is built without thread support), so a Python worker thread only advances in
the moments the GUI runs Python and a long run in a thread crawls. The engine therefore
writes its long work as generators: each ``next()`` does one short step (well under a
second on a laptop) and returns, and the caller decides what happens between steps.

- The command line and the tests run the steps in a plain loop (:func:`run_steps`).
- The Slicer panel runs the steps from a ``QTimer`` on the main thread, about
  0.1 s of them per tick (:class:`SteppedRun`, driven by ``panel.PanelRun``), updating
  the progress bar and honouring Cancel between steps; closing the generator
  (``close()``) cancels it cleanly.

A step generator yields ``None`` and returns its result (``return value`` in the
generator, ``yield from`` to call one from another). Only the standard library is used,
so every engine module can import this one.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Generator, Optional, Tuple, TypeVar

T = TypeVar("T")

#: A computation in steps: yields ``None`` between steps, returns ``T`` at the end.
Steps = Generator[None, None, T]
#: How a computation reports how far it is: ``progress(fraction 0-1, message)``.
ProgressFn = Callable[[float, str], None]


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


def timed(steps: "Steps[T]") -> "Steps[Tuple[T, float]]":
    """``steps``, returning ``(result, seconds spent inside its steps)``: the time a run
    took without the pauses a GUI made between steps."""
    spent = 0.0
    try:
        while True:
            start = time.perf_counter()
            try:
                next(steps)
            except StopIteration as done:
                return done.value, spent + time.perf_counter() - start
            spent += time.perf_counter() - start
            yield
    finally:
        steps.close()


class SteppedRun:
    """Drives a step generator from a GUI timer: :meth:`tick` runs steps until about
    ``budget_s`` has passed, then returns so the GUI can repaint and take clicks.

    Used by the Slicer panel (a ``QTimer`` calls :meth:`tick`; nothing here needs Qt),
    so the run happens on the main thread, where the GIL is. The state is plain: ``done``
    once finished, cancelled or failed; ``result`` or ``error`` then says which.
    """

    def __init__(self, steps: "Steps[Any]", budget_s: float = 0.1) -> None:
        self._steps = steps
        self.budget_s = budget_s
        self.done = False
        self.cancelled = False
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.steps_run = 0
        self.longest_step_s = 0.0

    def tick(self) -> bool:
        """Run steps for about ``budget_s``; True while more remain."""
        if self.done:
            return False
        start = time.perf_counter()
        while True:
            began = time.perf_counter()
            try:
                next(self._steps)
            except StopIteration as finished:
                self.result, self.done = finished.value, True
            except Exception as exc:   # handed to the caller, who shows it
                self.error, self.done = exc, True
            now = time.perf_counter()
            self.steps_run += 1
            self.longest_step_s = max(self.longest_step_s, now - began)
            if self.done or now - start >= self.budget_s:
                return not self.done

    def cancel(self) -> None:
        """Abandon the run between steps (the generator's clean-up runs)."""
        if not self.done:
            self._steps.close()
            self.done = self.cancelled = True
