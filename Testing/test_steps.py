"""The stepped run against Slicer's GIL condition, reproduced in plain CPython.

Inside Slicer the main thread holds the GIL while the Qt event loop idles (PythonQt has
no thread support), and a thread-based run only advances in the moments the main thread
runs Python. Here the main thread "idles" in ``usleep`` called through ``ctypes.PyDLL``,
which keeps the GIL, then runs a short Python tick, exactly like a ``QTimer`` callback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Callable, Optional

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import inference, phantom, steps
from BrainLobeSegLib.errors import Cancelled

#: usleep through PyDLL: the GIL stays held while it sleeps, as in Qt's event loop.
LIBC = ctypes.PyDLL(ctypes.util.find_library("c"))
#: The thread-based panel polled its worker every 100 ms; the stepped panel's timer fires
#: as soon as the event loop is free (interval 0): 1 ms of event handling is assumed.
THREAD_POLL_S, STEP_TIMER_S = 0.1, 0.001


def slicer_like_main_loop(tick: Callable[[], None], finished: Callable[[], bool],
                          idle_s: float, deadline_s: float) -> Optional[float]:
    """Seconds until ``finished()``, with the main thread holding the GIL while idle;
    None if not finished within ``deadline_s``."""
    start = time.perf_counter()
    while not finished():
        LIBC.usleep(int(idle_s * 1e6))
        tick()
        if time.perf_counter() - start > deadline_s:
            return None
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def bundled_3d():
    try:
        return inference.Segmenter("3d", device="cpu")
    except Exception as exc:   # the bundled models are part of the repository
        pytest.fail(f"bundled 3D model not loadable: {exc}")


def test_stepped_run_keeps_its_speed_where_a_thread_starves(bundled_3d):
    case = phantom.make_scan(size=(96, 96, 48), angles_deg=(8.0, 3.0, -2.0), seed=1)
    seg = bundled_3d
    seg.segment(case.ct, case.transform)    # warm-up (first-call allocations)
    t = time.perf_counter()
    reference = seg.segment(case.ct, case.transform)
    plain = time.perf_counter() - t

    run = steps.SteppedRun(seg.segment_steps(case.ct, case.transform), budget_s=0.05)
    stepped = slicer_like_main_loop(run.tick, lambda: run.done, STEP_TIMER_S, 10 * plain + 5)
    assert run.error is None and stepped is not None
    assert np.array_equal(sitk.GetArrayFromImage(run.result.labels_scan),
                          sitk.GetArrayFromImage(reference.labels_scan))
    assert stepped < 1.5 * plain + 0.5, f"stepped {stepped:.2f} s against {plain:.2f} s in a loop"

    stop = threading.Event()
    worker = threading.Thread(target=_segment_until_stopped, args=(seg, case, stop), daemon=True)
    worker.start()
    threaded = slicer_like_main_loop(lambda: None, lambda: not worker.is_alive(), THREAD_POLL_S,
                                     2 * plain + 1)
    stop.set()
    worker.join(60)
    assert threaded is None, (f"the thread finished in {threaded:.2f} s (plain {plain:.2f} s): "
                              "the GIL condition was not reproduced")


def _segment_until_stopped(seg, case, stop: threading.Event) -> None:
    try:
        seg.segment(case.ct, case.transform, cancel=stop.is_set)
    except Cancelled:
        pass


def test_stepped_run_reports_errors_and_cancels_cleanly():
    cleaned = []

    def work():
        try:
            yield
            yield
            raise ValueError("bad input")
        finally:
            cleaned.append(True)

    run = steps.SteppedRun(work(), budget_s=0.0)
    assert run.tick() and run.tick()          # one step per tick with no budget
    assert not run.tick() and run.done and isinstance(run.error, ValueError)
    assert cleaned == [True]

    cleaned.clear()
    run = steps.SteppedRun(work(), budget_s=0.0)
    run.tick()
    run.cancel()
    assert run.done and run.cancelled and run.error is None and cleaned == [True]
    assert not run.tick()


def test_within_keeps_the_mode_inside_the_steps():
    import torch
    seen = []

    def work():
        seen.append(torch.is_inference_mode_enabled())
        yield
        seen.append(torch.is_inference_mode_enabled())
        return 7

    gen = steps.within(torch.inference_mode, work())
    next(gen)
    assert not torch.is_inference_mode_enabled()   # nothing leaks between steps
    assert steps.run_steps(gen) == 7 and seen == [True, True]
