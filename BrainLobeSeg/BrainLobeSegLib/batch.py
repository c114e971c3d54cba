"""Many scans in one call: what ``segment`` and ``stats`` are given, as a list of cases.

An input is a scan file, a DICOM series folder, a dataset folder (docs/DESIGN.md
section 2: each case with its own ``N.txt``) or a glob pattern (``'scans/*.nii.gz'``,
expanded here too, so quoting it or a shell without globbing works alike). Every input
is resolved before anything is computed: a typo in the tenth path must not surface after
nine scans were segmented. Only the standard library and the engine's readers are used.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import imageio
from .errors import InputError

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Job:
    """One case to process: its name (output prefix), scan and transform file."""

    name: str
    scan: str
    transform: Optional[str] = None


def _is_image_file(path: str) -> bool:
    return os.path.isfile(path) and imageio.image_suffix(path) in imageio.IMAGE_SUFFIXES


def _expand_glob(pattern: str) -> List[str]:
    """The scans a pattern matches: image files and folders, not the dataset layout's label
    files (``N-seg.nii.gz``) or a transform ``.txt`` that ``data/*`` also matches."""
    from .dataset import natural_key
    hits = [p for p in glob.glob(pattern)
            if os.path.isdir(p) or (_is_image_file(p) and not imageio.strip_image_suffix(p).endswith("-seg"))]
    if not hits:
        raise InputError(f"no scan matches {pattern}.", "Check the pattern (quote it to let "
                         "brainlobeseg expand it).")
    return sorted(hits, key=lambda p: natural_key(os.path.basename(p)))


def _jobs_of(path: str) -> List[Job]:
    """The cases of one existing path (a file, a DICOM folder or a dataset folder)."""
    if os.path.isdir(path) and not imageio.dicom_series_ids(path):
        from .dataset import list_cases
        return [Job(c.name, str(c.image_path), str(c.transform_path) if c.transform_path else None)
                for c in list_cases(path)]
    return [Job(imageio.strip_image_suffix(path), path)]


def expand_inputs(inputs: Sequence[str], transform: Optional[str] = None) -> List[Job]:
    """Every case of ``inputs`` in order; ``transform`` (``--transform``) only with one case.

    Refused before any work: a path that does not exist, a pattern without matches, and
    two cases of the same name (their outputs would overwrite each other).
    """
    jobs: List[Job] = []
    for spec in inputs:
        if not os.path.exists(spec) and _GLOB_CHARS & set(spec):
            paths = _expand_glob(spec)
        else:   # not found, a link loop, a FIFO: each named as what it is
            imageio.check_input_file(spec, "scan")
            paths = [spec]
        for path in paths:
            jobs += _jobs_of(path)
    if transform:
        if len(jobs) != 1:
            raise InputError(f"--transform goes with one scan; {len(jobs)} cases were given.",
                             "Put each case's transform next to it as N.txt in a dataset folder "
                             "(docs/DESIGN.md section 2).")
        jobs = [Job(jobs[0].name, jobs[0].scan, transform)]
    seen: Dict[str, Job] = {}
    for job in jobs:
        if job.name in seen:
            raise InputError(f"two inputs make the case name {job.name} ({seen[job.name].scan} and "
                             f"{job.scan}); their results would overwrite each other.",
                             "Segment them into different -o folders, or rename one.")
        seen[job.name] = job
    return jobs


def existing(outdir: str, names: Sequence[str]) -> List[Path]:
    """Those of a case's output files (by name) that are already in ``outdir``."""
    return [Path(outdir) / n for n in names if (Path(outdir) / n).exists()]
