"""NumPy's transparent-huge-page advice, switched off while the engine computes.

NumPy asks the Linux kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) for
every array of 4 MB or more. Where the kernel's ``defrag`` policy is ``madvise`` (the
default of many distributions, and of this project's VM), a page fault in such an array
may first compact memory, and in a process that has just run a network that stalled a
0.06 s step for 0.5-1.3 s: the Slicer panel's longest step (target about 0.3 s) was such
a stall (STEPS_RESULTS.md). The engine's arrays are written once and read a few times, so
huge pages gain it little; without the advice the stepped ensemble run passed.

:func:`without_numpy_huge_pages` turns the advice off for the ``with`` block and restores
what it was, so inside Slicer the application's own setting holds between the engine's
steps. NumPy exposes the switch only as ``_set_madvise_hugepage`` (NumPy >= 1.20, the
documented ``NUMPY_MADVISE_HUGEPAGE`` variable sets its start value); without it the
block changes nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional


def madvise_switch() -> Optional[Callable[[bool], bool]]:
    """NumPy's ``_set_madvise_hugepage(enabled) -> previous``, where this NumPy has it."""
    import numpy as np
    for module in ("_core", "core"):   # NumPy 2 / NumPy 1.x
        multiarray = getattr(getattr(np, module, None), "multiarray", None)
        switch = getattr(multiarray, "_set_madvise_hugepage", None)
        if callable(switch):
            return switch
    return None


@contextmanager
def without_numpy_huge_pages() -> Iterator[None]:
    """NumPy allocates without huge-page advice inside the block (see the module)."""
    switch = madvise_switch()
    if switch is None:
        yield
        return
    previous = switch(False)
    try:
        yield
    finally:
        switch(previous)
