"""What limits the ASPECTS read-out on small infarcts? (issue 16; printed numbers)

The read-out misses many -4 HU infarcts over 30 % of a region (ASPECTS_RESULTS.md). This
experiment asks which part of the synthesis hides them: the same normal scans are made again
(same seeds) with one component switched off at a time (the left/right asymmetry and
midline shift, the shading and beam hardening, the noise, the cortical folding texture,
atrophy), -4 HU x 30 % infarcts are inserted as ``aspects_bench`` does, and each variant
prints how well four region statistics of the read-out separate infarcted regions from
normal ones: the bundled card's call score (what the read-out calls on), the darkest part
(8 mm), the mean evidence against the mirror side, and the share of the measured tissue
>= 2 HU darker. "sens" is the share of infarcted regions beyond the value that only 3 % of
the normal regions reach (97 % specificity, each variant's own); "sd" is the spread of the
statistic over the normal regions.

The regions are the synthesis's own labels (no segmentation), so what is measured is the
evidence itself. All scans are synthetic, from one atlas.

    python Testing/benchmarks/aspects_limits.py --atlas-dir ../shared/data --cases 12
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aspects_bench  # noqa: E402  (the infarct insertion and region choice of the benchmark)

from BrainLobeSegLib import aspects  # noqa: E402

#: Synthesis range overrides per variant (training.synth profile v2 field names).
VARIANTS: Dict[str, dict] = {
    "as synthesised": {},
    "no asymmetry/shift": dict(asymmetry_mm=(0.0, 0.0), midline_shift_probability=0.0),
    "no shading/beam hardening": dict(shading_hu=(0.0, 0.0), beam_hardening_hu=(0.0, 0.0)),
    "noise 2 HU": dict(noise_hu=(2.0, 2.0)),
    "no folding texture": dict(folding_depth=(0.0, 0.0)),
    "no atrophy": dict(atrophy=(0.0, 0.0)),
    "noise 2 HU, no folding, no atrophy": dict(noise_hu=(2.0, 2.0), folding_depth=(0.0, 0.0),
                                               atrophy=(0.0, 0.0)),
}
#: (name, read-out value, sign): sign -1 where an infarct lowers the value.
STATISTICS = (("call score", "call_score", 1.0), ("darkest part (8 mm)", "dark", -1.0),
              ("mean evidence", "mean", -1.0), ("share >= 2 HU darker", "frac", 1.0))


def region_statistics(result: aspects.AspectsResult) -> Dict[int, List[Optional[float]]]:
    """Per region label, the statistics of :data:`STATISTICS` (None: not measured)."""
    return {r.label: [r.call_score if key == "call_score" else r.measures.get(key) for _, key, _ in STATISTICS]
            for r in result.regions}


def measure_variant(atlas, overrides: dict, cases: int, seed: int, inplane: int):
    """(normal, infarcted) region statistics of one synthesis variant."""
    from training import synth
    prof = synth.get_profile("v2", infarct_probability=0.0, slice_mm=(1.0, 5.0), **overrides)
    normal: List[List[Optional[float]]] = []
    infarcted: List[List[Optional[float]]] = []
    rng = np.random.default_rng(5)
    for i in range(cases):
        made = synth.synth_case(atlas, seed, i, inplane, profile=prof)
        truth = sitk.Resample(made.labels, made.ct, made.transform.GetInverse(), sitk.sitkNearestNeighbor, 0)
        case = aspects_bench.Case(str(i + 1), made.ct, made.transform,
                                  sitk.GetArrayFromImage(truth).astype(np.uint8), synth.params_json(made.params))
        normal += region_statistics(aspects.read_out(aspects.evidence_maps(made.ct, truth))).values()
        for k in range(4):
            labels = aspects_bench.choose_regions(case, ("cortical", "deep")[k % 2], rng)
            lowered = aspects_bench.insert_infarcts(case, labels, 0.3, -4.0, rng)
            found = region_statistics(aspects.read_out(aspects.evidence_maps(lowered, truth)))
            infarcted += [found[lab] for lab in labels]
    return normal, infarcted


def separation(normal: List[List[Optional[float]]], infarcted: List[List[Optional[float]]]) -> str:
    """Per statistic: sensitivity at 97 % specificity on the normal regions, and their sd.
    An infarcted region without a value (too little tissue) counts as missed."""
    out = []
    for j, (name, _, sign) in enumerate(STATISTICS):
        base = np.array([sign * row[j] for row in normal if row[j] is not None])
        threshold = np.percentile(base, 97)
        found = [row[j] is not None and sign * row[j] > threshold for row in infarcted]
        out.append(f"{name}: sens {float(np.mean(found)):.2f} (sd {base.std():.2f})")
    return "; ".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atlas-dir", required=True, help="atlas folder (Clinical-scct/, aspects-on-cta/)")
    p.add_argument("--cases", type=int, default=12, help="normal scans per variant (default 12)")
    p.add_argument("--seed", type=int, default=9350, help="synthesis seed (default: the tuning set's)")
    p.add_argument("--inplane", type=int, default=256, help="in-plane matrix (default 256)")
    args = p.parse_args(argv)
    from training import synth
    atlas = synth.load_atlas(args.atlas_dir)
    for name, overrides in VARIANTS.items():
        t0 = time.perf_counter()
        normal, infarcted = measure_variant(atlas, overrides, args.cases, args.seed, args.inplane)
        print(f"{name:<36} {len(normal)} normal, {len(infarcted)} infarcted regions (-4 HU x 30 %): "
              f"{separation(normal, infarcted)}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
