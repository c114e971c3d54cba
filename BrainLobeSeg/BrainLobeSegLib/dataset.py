"""The dataset layout of docs/DESIGN.md section 2, read and written in one place.

A dataset is a folder of cases::

    N.nii.gz        the CT in HU (``N.nii`` accepted too)
    N.txt           optional: R, upright -> scan, as ITK-SNAP writes it (identity if absent)
    N-seg.nii.gz    optional: uint8 labels 0..20 on the grid of N.nii.gz, in the upright
                    layout (``sitk.Resample(ct, ct, R)`` lies on them); ``N-seg.nii`` too

Training, evaluation, the command line and the Slicer module's "save corrected case"
button all go through this module, so a file that one of them refuses is refused by
all, with the same message, and a case written by one is read by all.

Reading checks what SimpleITK lets through silently (a cut ``.nii.gz`` reads as data
followed by zeros, a float label map as fractions, a label map on another grid as a
plausible image); writing is atomic, so an interrupted save never leaves a case that
reads as valid but is half-written.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from . import regions, transforms
from .errors import InputError
# One gzip check for the whole engine: it lives with the scan reader and is re-exported
# here because dataset files are where a cut download usually shows up.
from .imageio import (check_gzip_complete, default_file_mode, read_scan, same_grid,
                      write_image_verified)

__all__ = ["Case", "list_cases", "read_case", "next_case_name", "write_case",
           "check_gzip_complete", "check_labels", "natural_key"]

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_SUFFIXES = (".nii.gz", ".nii")
SEG_TAG = "-seg"
TRANSFORM_SUFFIX = ".txt"
_TEMP_PREFIX = ".partial-"
_MAX_LISTED_VALUES = 10


@dataclass(frozen=True)
class Case:
    """The files of one case; ``transform_path``/``seg_path`` are None when absent."""

    name: str
    image_path: Path
    transform_path: Optional[Path] = None
    seg_path: Optional[Path] = None


def natural_key(name: str) -> Tuple:
    """Sort key that orders ``2`` before ``10`` (digits compare as numbers)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower())
                 for part in re.split(r"(\d+)", name) if part)


def _split_image_name(filename: str) -> Optional[Tuple[str, str]]:
    """``12-seg.nii.gz`` -> (``12-seg``, ``.nii.gz``); None for anything else."""
    low = filename.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], suffix
    return None


def _scan_folder(folder: Path) -> Tuple[Dict[str, List[Path]], Dict[str, List[Path]]]:
    """Image files and label files of a folder, by case name (temp/hidden files skipped)."""
    images: Dict[str, List[Path]] = {}
    segs: Dict[str, List[Path]] = {}
    for entry in sorted(os.listdir(folder)):
        if entry.startswith("."):
            continue
        split = _split_image_name(entry)
        path = folder / entry
        if split is None or not path.is_file():
            continue
        stem = split[0]
        if stem.lower().endswith(SEG_TAG):
            segs.setdefault(stem[: -len(SEG_TAG)], []).append(path)
        else:
            images.setdefault(stem, []).append(path)
    return images, segs


def _one(paths: List[Path], what: str, name: str) -> Path:
    if len(paths) > 1:
        raise InputError(f"case {name} has {len(paths)} {what} files "
                         f"({', '.join(p.name for p in paths)}).",
                         "Keep one of them (.nii.gz or .nii) and move the other away.")
    return paths[0]


def list_cases(folder: PathLike) -> List[Case]:
    """The cases of a dataset folder, sorted naturally (``2`` before ``10``).

    A case is an image ``N.nii.gz``/``N.nii``; label files without an image are ignored
    (an interrupted copy), because only the image makes a case.
    """
    root = Path(folder)
    if not root.exists():
        raise InputError(f"dataset folder not found: {root}.", "Check the path.")
    if not root.is_dir():
        raise InputError(f"{root} is a file, not a dataset folder.",
                         "Give the folder that holds N.nii.gz, N.txt and N-seg.nii.gz.")
    images, segs = _scan_folder(root)
    if not images:
        raise InputError(f"{root} holds no cases (no N.nii.gz images).",
                         "Give a folder in the dataset layout: N.nii.gz, optional N.txt, "
                         "N-seg.nii.gz.")
    cases = []
    for name in sorted(images, key=natural_key):
        tf = root / f"{name}{TRANSFORM_SUFFIX}"
        cases.append(Case(name=name, image_path=_one(images[name], "image", name),
                          transform_path=tf if tf.is_file() else None,
                          seg_path=_one(segs[name], "label", name) if name in segs else None))
    return cases


# ----------------------------------------------------------------------------- reading

def _check_volume(image: sitk.Image, path: Path, what: str) -> None:
    """A case file is one scalar 3D volume (SimpleITK also reads 2D, 4D and vectors)."""
    if image.GetDimension() != 3:
        raise InputError(f"the {what} {path.name} is {image.GetDimension()}D "
                         f"(size {image.GetSize()}); a case is one 3D volume.",
                         "Export the 3D volume alone (one series, one time point).")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {what} {path.name} has {image.GetNumberOfComponentsPerPixel()} "
                         "values per voxel (a colour or vector image).",
                         "Give a single-channel (grey-value or label) volume.")


def _format_values(values: np.ndarray) -> str:
    shown = [f"{v:g}" for v in values[:_MAX_LISTED_VALUES]]
    more = len(values) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def check_labels(labels: sitk.Image, source: str = "the label image") -> sitk.Image:
    """Return ``labels`` as uint8 after checking every voxel is a label id 0..20.

    Fractional or out-of-range values mean the file is not a label map of this project
    (a probability map, another atlas, an interpolated resample); they are named in the
    message so the user can tell which.
    """
    arr = sitk.GetArrayViewFromImage(labels)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= regions.NUM_LABELS:
            return sitk.Cast(labels, sitk.sitkUInt8)
        bad = np.unique(arr[(arr < 0) | (arr > regions.NUM_LABELS)])
    else:
        bad_mask = ~np.isfinite(arr) | (arr < 0) | (arr > regions.NUM_LABELS) | (arr != np.round(arr))
        if not bad_mask.any():
            return sitk.Cast(labels, sitk.sitkUInt8)
        bad = np.unique(arr[bad_mask])
    raise InputError(f"{source} holds values that are not label ids 0..{regions.NUM_LABELS}: "
                     f"{_format_values(bad)}.",
                     "Give the label map of this project (0 background, 1-10 left, 11-20 right "
                     "regions), saved with nearest-neighbour interpolation.")


def _read_image(path: Path, what: str) -> sitk.Image:
    """Read one case file with the engine's checks (missing, empty, cut, NaN, not 3D)."""
    image = read_scan(str(path))   # includes check_gzip_complete for .nii.gz
    _check_volume(image, path, what)
    return image


def read_case(case: Case, invert_transform: bool = False
              ) -> Tuple[sitk.Image, sitk.AffineTransform, Optional[sitk.Image]]:
    """Read and check a case: (CT, R upright -> scan, labels as uint8 or None).

    ``invert_transform`` is for datasets whose ``N.txt`` maps scan -> upright; nothing
    here guesses the direction.
    """
    ct = _read_image(Path(case.image_path), "scan")
    tf_path = str(case.transform_path) if case.transform_path is not None else None
    transform = transforms.read_transform(tf_path, invert=invert_transform)
    if case.seg_path is None:
        return ct, transform, None
    seg_path = Path(case.seg_path)
    seg = _read_image(seg_path, "label file")
    diff = same_grid(ct, seg)
    if diff is not None:
        raise InputError(f"the label file {seg_path.name} is not on the grid of "
                         f"{Path(case.image_path).name}: {diff}.",
                         "Save the labels on the scan's own grid (as ITK-SNAP does when the "
                         "segmentation is saved with the scan loaded as main image).")
    return ct, transform, check_labels(seg, f"the label file {seg_path.name}")


# ----------------------------------------------------------------------------- writing

def _case_files(folder: Path, name: str) -> List[Path]:
    """Every file name that belongs to case ``name`` (existing or not)."""
    names = [name + s for s in IMAGE_SUFFIXES] + [name + SEG_TAG + s for s in IMAGE_SUFFIXES]
    return [folder / n for n in names + [name + TRANSFORM_SUFFIX]]


def existing_case_files(folder: PathLike, name: str) -> List[Path]:
    """The files of case ``name`` that exist in ``folder`` (image, labels, transform):
    what writing that case would replace."""
    return [p for p in _case_files(Path(folder), name) if p.exists()]


def next_case_name(folder: PathLike) -> str:
    """The next free integer name: one more than the largest number used in the folder.

    Gaps are not reused: a number may belong to a case deleted on purpose, and reusing
    it would pair old derived files (caches, reports) with a new case.
    """
    root = Path(folder)
    if not root.is_dir():
        return "1"
    used = [int(m.group(1)) for entry in os.listdir(root)
            for m in [re.match(r"^(\d+)(?:-seg)?(?:\.nii\.gz|\.nii|\.txt)$", entry, re.I)] if m]
    return str(max(used, default=0) + 1)


def _check_name(name: str) -> str:
    name = str(name)
    if not name or name != os.path.basename(name) or name.startswith(".") \
            or name.lower().endswith(SEG_TAG) or _split_image_name(name) is not None \
            or name.endswith(TRANSFORM_SUFFIX):
        raise InputError(f"{name!r} cannot be a case name.",
                         "Use a plain name such as 12 (no folder, suffix or '-seg').")
    return name


def _temp_path(folder: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=suffix, dir=folder)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move a complete temp file into place; without ``overwrite`` never replace a file.

    ``os.link`` fails if the target exists, so two writers racing for the same new
    case number cannot overwrite each other; where links are not supported the check
    falls back to an existence test.
    """
    os.chmod(tmp, default_file_mode())   # mkstemp makes files private (0600)
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise InputError(f"{final} already exists.", "Choose another case name, or overwrite "
                         "on purpose.") from None
    except OSError:
        if final.exists():
            raise InputError(f"{final} already exists.", "Choose another case name.") from None
        os.replace(tmp, final)
        return
    os.remove(tmp)


def write_case(folder: PathLike, ct: sitk.Image, seg: Optional[sitk.Image],
               transform: Optional[sitk.Transform] = None, name: Optional[str] = None,
               overwrite: bool = False, compress: bool = True) -> Case:
    """Write a case (``name`` or the next free number) and return its :class:`Case`.

    ``seg`` must lie on the grid of ``ct`` in the upright layout; it is stored as uint8.
    Files are written under temporary names in the same folder and renamed when all are
    complete, the image last (the image is what makes a case), so an interrupted write
    leaves no case that looks valid. An existing case is only replaced with
    ``overwrite=True``, and then its stale files (an old ``N.txt`` when ``transform``
    is None, an ``N.nii`` next to a new ``N.nii.gz``) are removed.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    name = _check_name(name) if name is not None else next_case_name(root)
    _check_volume(ct, Path(f"{name}.nii.gz"), "scan")
    labels = None
    if seg is not None:
        _check_volume(seg, Path(f"{name}{SEG_TAG}.nii.gz"), "label image")
        diff = same_grid(ct, seg)
        if diff is not None:
            raise InputError(f"the labels of case {name} are not on the scan's grid: {diff}.",
                             "Resample the labels onto the scan grid (nearest neighbour) first.")
        labels = check_labels(seg, f"the labels of case {name}")
    if transform is not None:
        transforms.validate(transform, source=f"the transform of case {name}")
    existing = existing_case_files(root, name)
    if existing and not overwrite:
        raise InputError(f"case {name} already exists in {root} "
                         f"({', '.join(p.name for p in existing)}).",
                         "Choose another name, leave the name out to get the next number, "
                         "or overwrite on purpose.")
    image_path = root / f"{name}.nii.gz"
    seg_path = root / f"{name}{SEG_TAG}.nii.gz" if labels is not None else None
    tf_path = root / f"{name}{TRANSFORM_SUFFIX}" if transform is not None else None
    temps: List[Path] = []
    try:
        planned = []
        if labels is not None:
            temps.append(_temp_path(root, ".nii.gz"))
            write_image_verified(labels, str(temps[-1]), compress)
            planned.append((temps[-1], seg_path))
        if transform is not None:
            temps.append(_temp_path(root, TRANSFORM_SUFFIX))
            transforms.write_transform(str(temps[-1]), transform)
            planned.append((temps[-1], tf_path))
        temps.append(_temp_path(root, ".nii.gz"))
        write_image_verified(ct, str(temps[-1]), compress)
        planned.append((temps[-1], image_path))
        if overwrite:
            for stale in set(existing) - {image_path, seg_path, tf_path}:
                stale.unlink()
        published: List[Path] = []
        try:
            for tmp, final in planned:
                _publish(tmp, final, overwrite)
                published.append(final)
        except BaseException:
            if not overwrite:   # another writer took the name meanwhile: leave its case whole
                for path in published:
                    path.unlink()
            raise
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()
    return Case(name=name, image_path=image_path, transform_path=tf_path, seg_path=seg_path)
