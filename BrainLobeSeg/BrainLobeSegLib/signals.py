"""Process signals that stop a run: one place that swaps their handlers.

The CLI turns SIGTERM and SIGHUP into ``KeyboardInterrupt`` (so staging folders are cleaned
up on the way out), and :class:`output.OutputSet` holds all three stop signals while it
moves a case's files into place (so a case is never half old, half new). Both swap Python
signal handlers for a while and put the previous ones back; that is only possible in the
main thread, and elsewhere (Slicer's or a test's worker thread) signals do not reach
Python code anyway, so there the block runs as it is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, List, Sequence

#: Signals that stop a run, where the platform has them: Ctrl+C, ``kill`` or a job
#: scheduler, a closed terminal.
STOP_SIGNALS: List[int] = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                           if hasattr(signal, name)]


@contextlib.contextmanager
def handlers_swapped(signals: Sequence[int], handler: Callable) -> Iterator[None]:
    """``handler`` for ``signals`` inside the block, the previous handlers after it.

    Left alone: signals whose handler was not set from Python (``getsignal`` is None), and
    signals the process was told to ignore (``nohup`` ignores SIGHUP, a background job of
    a shell without job control SIGINT): the user asked for the run to outlive them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in signals if signal.getsignal(s) not in (None, signal.SIG_IGN)]
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold the stop signals for the duration of a few file moves, then deliver them.

    Python runs signal handlers between bytecodes, so an interrupt can land between two
    ``os.replace`` calls. The moves take milliseconds; waiting for them costs the user
    nothing and keeps the output consistent.
    """
    caught: List[int] = []
    try:
        with handlers_swapped(STOP_SIGNALS, lambda signum, frame: caught.append(signum)):
            yield
    finally:
        for s in caught:
            signal.raise_signal(s)
