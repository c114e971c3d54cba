"""The stepped run as the Slicer panel drives it, against the CLI's plain loop (issue 13).

On the synthetic 512x512x110 int16 head CT of ``bench.py`` with the bundled model of
``--mode`` (default 3d): the CLI's time (the steps in a plain loop, as ``segment``
runs them), then the same steps driven the panel's way, one ``SteppedRun.tick`` per
timer event on a main thread that holds the GIL between ticks (``usleep`` through
``ctypes.PyDLL``, 1 ms per event-loop turn). Prints the longest step, where it was, the
number of steps and the ratio of the totals. Targets: longest step <= 0.3 s, total
within 10 % of the CLI's.

    python Testing/benchmarks/steps_bench.py [--mode 3d] [--repeat 3] [--budget 0.1]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "BrainLobeSeg"))
sys.path.insert(0, str(HERE.parent.parent))

from BrainLobeSegLib import imageio, inference, steps, transforms  # noqa: E402
from Testing.benchmarks.bench import make_bench_scan  # noqa: E402

LIBC = ctypes.PyDLL(ctypes.util.find_library("c"))
EVENT_LOOP_TURN_S = 0.001
TARGET_STEP_S, TARGET_RATIO = 0.3, 1.10


def timed_steps(gen: "steps.Steps", messages: List[str]) -> Tuple[object, List[Tuple[float, str]]]:
    """Run every step, timing each, with the last progress message as its label."""
    durations: List[Tuple[float, str]] = []
    while True:
        t = time.perf_counter()
        try:
            next(gen)
        except StopIteration as done:
            durations.append((time.perf_counter() - t, messages[-1] if messages else ""))
            return done.value, durations
        durations.append((time.perf_counter() - t, messages[-1] if messages else ""))


def panel_like(seg: inference.Segmenter, scan, transform, budget: float) -> Tuple[float, int, float]:
    """Total seconds, steps and longest step of a SteppedRun ticked from a GIL-holding loop."""
    run = steps.SteppedRun(seg.segment_steps(scan, transform), budget_s=budget)
    start = time.perf_counter()
    while not run.done:
        LIBC.usleep(int(EVENT_LOOP_TURN_S * 1e6))
        run.tick()
    if run.error is not None:
        raise run.error
    return time.perf_counter() - start, run.steps_run, run.longest_step_s


def estimate_path(seg: inference.Segmenter) -> bool:
    """The panel's default for a CT without a transform: the pose estimated in steps, then
    segmented with the region check (:func:`region_pose.segment_with_pose_steps`), on the
    reference head posed in a 512x512x110 int16 grid (the analytic phantom is no MNI head,
    so its pose cannot be estimated; see alignment.py)."""
    from BrainLobeSegLib import alignment, phantom, region_pose
    scan, _ = phantom.make_reference_scan((20.0, 6.0, -9.0), size=(512, 512, 110),
                                          spacing=(0.45, 0.45, 1.5), seed=2)

    def whole() -> "steps.Steps":
        est = yield from alignment.estimate_pose_steps(scan, progress=lambda f, m: messages.append(f"pose: {m}"))
        pose = alignment.PoseChoice(est.transform, "estimated", est)
        return (yield from region_pose.segment_with_pose_steps(
            seg, scan, pose, progress=lambda f, m: messages.append(m)))

    messages: List[str] = []
    t = time.perf_counter()
    (_, pose), durations = timed_steps(whole(), messages)
    total = time.perf_counter() - t
    worst = max(durations)
    print(f"automatic pose path (estimate, segment, region check{', segment again' if pose.estimate.region_corrected else ''}): "
          f"{total:.2f} s in {len(durations)} steps; longest {worst[0]:.3f} s at '{worst[1]}'")
    top = sorted(durations, reverse=True)[:5]
    print("five longest steps: " + "; ".join(f"{d:.3f} s '{m}'" for d, m in top))
    return worst[0] <= TARGET_STEP_S


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="3d")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.1, help="seconds of steps per timer tick")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--estimate", action="store_true",
                   help="also time the automatic-pose path (estimate, segment, region check)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        scan_path, tf_path, desc = make_bench_scan(Path(tmp), (512, 512, 110), None, (10.0, 5.0, -4.0), 0)
        scan, transform = imageio.read_scan(scan_path), transforms.read_transform(tf_path)
    seg = inference.Segmenter(args.mode, device="cpu", threads=args.threads)
    seg.segment(scan, transform)   # warm-up
    cli_s, panel_s, longest = [], [], []
    for _ in range(args.repeat):
        messages: List[str] = []
        t = time.perf_counter()
        _, durations = timed_steps(seg.segment_steps(scan, transform, progress=lambda f, m: messages.append(m)),
                                   messages)
        cli_s.append(time.perf_counter() - t)
        longest.append(max(durations))
        total, count, _ = panel_like(seg, scan, transform, args.budget)
        panel_s.append(total)
    cli, panel = statistics.median(cli_s), statistics.median(panel_s)
    worst = max(longest)
    print(f"scan: {desc}; mode {args.mode}; {len(durations)} steps per run; tick budget {args.budget} s")
    print(f"CLI loop (median of {args.repeat}): {cli:.2f} s; panel-like stepped run: {panel:.2f} s "
          f"({count} steps); ratio {panel / cli:.3f} (target <= {TARGET_RATIO})")
    print(f"longest step: {worst[0]:.3f} s at '{worst[1]}' (target <= {TARGET_STEP_S})")
    top = sorted(durations, reverse=True)[:5]
    print("five longest steps of the last run: " + "; ".join(f"{d:.3f} s '{m}'" for d, m in top))
    ok = worst[0] <= TARGET_STEP_S and panel / cli <= TARGET_RATIO
    if args.estimate:
        ok &= estimate_path(seg)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
