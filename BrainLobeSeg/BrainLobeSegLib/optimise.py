"""A derivative-free minimiser for the pose fits (no scipy on the inference path).

The symmetry plane (:mod:`symmetry_plane`) and the head's proportions
(:mod:`reference_registration`) are fits of two to three parameters whose cost is cheap,
a little noisy (sampled images) and has no gradient at hand: plain Nelder-Mead does.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import numpy as np

from .steps import Steps, run_steps


def nelder_mead(f: Callable[[np.ndarray], float], x0: Sequence[float], step: Sequence[float],
                iterations: int = 120, tol: float = 1e-4) -> Tuple[np.ndarray, float]:
    """Minimise ``f`` from ``x0`` (plain Nelder-Mead; no scipy on the inference path)."""
    return run_steps(nelder_mead_steps(f, x0, step, iterations, tol))


def nelder_mead_steps(f: Callable[[np.ndarray], float], x0: Sequence[float], step: Sequence[float],
                      iterations: int = 120, tol: float = 1e-4) -> "Steps[Tuple[np.ndarray, float]]":
    """:func:`nelder_mead` in steps of one iteration (see :mod:`steps`)."""
    n = len(x0)
    pts = [np.asarray(x0, float)]
    for i in range(n):
        p = np.asarray(x0, float).copy()
        p[i] += step[i]
        pts.append(p)
    vals = [f(p) for p in pts]
    for _ in range(iterations):
        yield
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (abs(vals[0]) + 1e-9):
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2.0 * (centroid - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:  # shrink towards the best point
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    best = int(np.argmin(vals))
    return pts[best], vals[best]
