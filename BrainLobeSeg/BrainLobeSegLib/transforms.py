"""The transform convention (docs/DESIGN.md section 2), in one place.

A case's transform file ``N.txt`` holds ``R``, read with SimpleITK. ``R`` maps a point of
the *upright* space (where the radiologist drew the labels) to the point of the *scan*
that is shown there, both in LPS millimetres:

    upright = sitk.Resample(ct, ct, R, sitk.sitkLinear, -1024)

So ``R`` is used as-is to pull scan intensities into the upright space, and its inverse
carries upright labels back onto the scan. Files written the other way round are read
with ``invert=True``; nothing here guesses the direction.

Slicer: a transform read from an ITK file is a "from parent" (resampling) transform in
RAS. Applied to the CT volume, ``R`` as "from parent" shows the head upright, so the
Slicer node's "to parent" matrix is ``inverse(R)`` converted LPS -> RAS.
"""

from __future__ import annotations

import math
import os
import warnings
import re
import tempfile
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError, InputWarning
from .imageio import captured_c_stderr, write_text_atomic

#: LPS <-> RAS flip (x and y change sign); its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_ITKSNAP_TYPE = "MatrixOffsetTransformBase_double_3_3"
# Types that SimpleITK reads as linear 3D maps (as the sole member of a composite too).
_LINEAR_TYPES = {
    "AffineTransform", "MatrixOffsetTransformBase", "Euler3DTransform", "VersorRigid3DTransform",
    "Similarity3DTransform", "ScaleVersor3DTransform", "ScaleSkewVersor3DTransform",
    "ScaleTransform", "ScaleLogarithmicTransform", "TranslationTransform", "VersorTransform",
    "Rigid3DTransform", "CenteredAffineTransform", "ComposeScaleSkewVersor3DTransform",
    "QuaternionRigidTransform", "IdentityTransform", "FixedCenterOfRotationAffineTransform",
}
# Singular value bounds: a head-pose transform is a rotation; scaling beyond these
# bounds is a warning, a (near) zero singular value an error.
_SCALE_WARN = 0.05
_SINGULAR_MIN = 1e-3
# Beyond these a file is not a head pose at all (wrong units, a projection, garbage);
# matrix_of() also loses precision once translations dwarf the 1 mm probe points.
_SCALE_MAX = 10.0
_TRANSLATION_MAX_MM = 1e4


class TransformWarning(InputWarning):
    """The transform loads but looks unusual (scaling, shear, very large rotation)."""


def identity() -> sitk.AffineTransform:
    """The transform of a case without ``N.txt``: upright space equals scan space."""
    return sitk.AffineTransform(3)


def matrix_of(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous LPS matrix of a linear transform (``q = M @ p``).

    Evaluated by mapping points rather than by reading parameters: SimpleITK wraps an
    ITK-SNAP file as a ``CompositeTransform`` whose member has no typed accessors.
    """
    base = np.array(transform.TransformPoint((0.0, 0.0, 0.0)), dtype=np.float64)
    m = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        m[:3, axis] = np.array(transform.TransformPoint(tuple(unit))) - base
    m[:3, 3] = base
    return m


def affine_from_matrix(m: np.ndarray) -> sitk.AffineTransform:
    """SimpleITK affine (centre 0) from a 4x4 homogeneous LPS matrix."""
    m = np.asarray(m, dtype=np.float64)
    tf = sitk.AffineTransform(3)
    tf.SetMatrix(m[:3, :3].ravel().tolist())
    tf.SetTranslation(m[:3, 3].tolist())
    return tf


def itk_types(transform: sitk.Transform) -> List[str]:
    """ITK class names inside a (possibly composite) transform, from its printout.

    SimpleITK has no typed view of a composite's members, so the RTTI lines of the
    printout are the reliable way to see a B-spline hiding in an ITK file.
    """
    names = re.findall(r"RTTI typeinfo:\s+itk::(\w+)<", str(transform))
    return [n for n in names if n != "CompositeTransform"]


def validate(transform: sitk.Transform, source: str = "the transform") -> sitk.AffineTransform:
    """Check a transform is a usable 3D linear head pose; return it as one affine.

    Raises :class:`InputError` for non-linear, non-3D, singular or non-finite
    transforms (SimpleITK loads all of these without complaint). Warns
    (:class:`TransformWarning`) on scaling, shear or mirroring, which a head pose
    should not have.
    """
    if transform.GetDimension() != 3:
        raise InputError(f"{source} is {transform.GetDimension()}D, not 3D.",
                         "Give the 3D transform saved with the scan.")
    for name in itk_types(transform):
        if name not in _LINEAR_TYPES:
            raise InputError(f"{source} is of type {name}, which is not a linear transform.",
                             "Give a rigid or affine ITK transform, as ITK-SNAP saves it.")
    m = matrix_of(transform)
    if not np.all(np.isfinite(m)):
        raise InputError(f"{source} contains NaN or infinite numbers.",
                         "Save the transform again from ITK-SNAP.")
    if np.abs(m[:3, 3]).max() > _TRANSLATION_MAX_MM:
        raise InputError(f"{source} moves the image by {np.abs(m[:3, 3]).max():.3g} mm, "
                         "far outside any scanner.", "Save the transform again from ITK-SNAP.")
    sv = np.linalg.svd(m[:3, :3], compute_uv=False)
    if sv.min() < _SINGULAR_MIN:
        raise InputError(f"{source} is singular (it flattens the image; singular values "
                         f"{', '.join(f'{s:.3g}' for s in sv)}).",
                         "Give the head-pose transform that ITK-SNAP saved, not a projection.")
    if sv.max() > _SCALE_MAX or sv.min() < 1.0 / _SCALE_MAX:
        raise InputError(f"{source} scales the image by {sv.min():.3g} to {sv.max():.3g}; a head "
                         "pose is a rotation (scale 1).",
                         "Check the file: it may use other units or not be a head-pose transform.")
    if np.linalg.det(m[:3, :3]) < 0:
        warnings.warn(f"{source} mirrors the image (negative determinant): left and right "
                      "would swap. Check the file.", TransformWarning, stacklevel=2)
    if np.abs(sv - 1.0).max() > _SCALE_WARN:
        warnings.warn(f"{source} scales or shears the image (singular values "
                      f"{', '.join(f'{s:.3f}' for s in sv)}); a head pose is a rotation. "
                      "The result may be distorted.", TransformWarning, stacklevel=2)
    return affine_from_matrix(m)


#: The allow-list of ITK text transform types: type -> (parameter count, accepted fixed
#: parameter counts). Exact counts, because ITK's text reader trusts the file: with no
#: parameters it crashes the process (a segmentation fault: Slicer would close), with too
#: few it reads past them. Types SimpleITK parses but cannot convert (CenteredAffine,
#: FixedCenterOfRotationAffine, Rigid3D, CenteredEuler3D, ComposeScaleSkewVersor3D,
#: ScalableAffine) are not listed: they are refused here, before ITK sees them. Measured
#: on SimpleITK 2.5 with every type name it knows, 0..20 parameters (Testing/test_fuzz.py).
_ITK_TEXT_TYPES = {
    "MatrixOffsetTransformBase": (12, (3,)), "AffineTransform": (12, (3,)),
    "Euler3DTransform": (6, (3, 4)), "VersorRigid3DTransform": (6, (3,)),
    "Similarity3DTransform": (7, (3,)), "QuaternionRigidTransform": (7, (3,)),
    "ScaleVersor3DTransform": (9, (3,)), "ScaleSkewVersor3DTransform": (15, (3,)),
    "ScaleTransform": (3, (3,)), "ScaleLogarithmicTransform": (3, (3,)),
    "VersorTransform": (3, (3,)), "TranslationTransform": (3, (0,)), "IdentityTransform": (0, (0,)),
}
_BINARY_TRANSFORM_SUFFIXES = (".mat", ".h5", ".hdf5")
_GIVE_ITKSNAP = f"Give the .txt/.tfm file that ITK-SNAP saves (Transform: {_ITKSNAP_TYPE})."


def _text_entries(path: str) -> List[dict]:
    """The ``Transform:`` entries of an ITK text file with their (fixed) parameters."""
    with open(path, "rb") as fh:
        text = fh.read(1 << 20).decode("utf-8", "replace")
    entries: List[dict] = []
    for line in text.lstrip("\ufeff").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "Transform":
            entries.append({"type": value.strip()})
        elif key in ("Parameters", "FixedParameters") and entries:
            entries[-1][key] = value.split()
    if not entries:
        raise InputError(f"cannot read the transform file {path}: it is not an ITK transform "
                         "(no 'Transform:' line).", _GIVE_ITKSNAP)
    return entries


def check_itk_text(path: str) -> None:
    """Check the structure of an ITK text transform file before ITK reads it.

    ITK's text reader crashes the process on some malformed files (any type with an
    empty ``Parameters:`` line), so every entry must be a type of the allow-list
    :data:`_ITK_TEXT_TYPES` with exactly its number of finite parameters. Several
    entries need a composite header: ITK would otherwise keep the first and silently
    drop the rest. Binary formats (.mat, .h5) are left to ITK.
    """
    if path.lower().endswith(_BINARY_TRANSFORM_SUFFIXES):
        return
    entries = _text_entries(path)
    if len(entries) > 1 and not entries[0]["type"].startswith("CompositeTransform_"):
        raise InputError(f"transform file {os.path.basename(path)} holds {len(entries)} transforms "
                         "without a composite header; only one of them would be used.",
                         "Save the single head-pose transform, or compose them into one first.")
    for i, entry in enumerate(entries):
        if not (i == 0 and len(entries) > 1):   # the composite header has no parameters
            _check_entry(path, entry)


def _check_entry(path: str, entry: dict) -> None:
    """One entry: an allowed 3D type, its exact parameter counts, finite numbers."""
    name = os.path.basename(path)
    found = re.fullmatch(r"(\w+?)_(?:double|float)_(\d)_(\d)", entry["type"])
    if found is None:
        raise InputError(f"cannot read the transform file {path}: it is not an ITK transform "
                         f"(unknown type {entry['type'][:60]!r}).", _GIVE_ITKSNAP)
    kind, dim_in, dim_out = found.groups()
    if (dim_in, dim_out) != ("3", "3"):
        raise InputError(f"transform file {name} is {dim_in}D, not 3D.",
                         "Give the 3D transform saved with the scan.")
    if kind not in _ITK_TEXT_TYPES:
        what = "which is not a linear transform" if kind not in _LINEAR_TYPES else "which BrainLobeSeg cannot read"
        raise InputError(f"transform file {name} is of type {kind}, {what}.",
                         "Give a rigid or affine ITK transform, as ITK-SNAP saves it.")
    count, fixed_counts = _ITK_TEXT_TYPES[kind]
    params, fixed = entry.get("Parameters"), entry.get("FixedParameters", [])
    if params is None or len(params) != count or (
            "FixedParameters" in entry and len(fixed) not in fixed_counts):
        raise InputError(f"cannot read the transform file {path}: it is not an ITK transform "
                         f"({kind} needs {count} parameters and "
                         f"{' or '.join(map(str, fixed_counts))} fixed parameters, the file has "
                         f"{len(params or [])} and {len(fixed)}).", "Save the transform again from ITK-SNAP.")
    for token in params + fixed:
        try:
            ok = math.isfinite(float(token))
        except ValueError:
            ok = False
        if not ok:
            raise InputError(f"transform file {name} contains NaN, infinite or unreadable "
                             f"numbers ({token[:20]!r}).", "Save the transform again from ITK-SNAP.")


def _read_itk(path: str) -> sitk.Transform:
    """``sitk.ReadTransform``, for a text file saved with a UTF-8 byte order mark too
    (Windows editors add one; ITK then refuses the first line): a copy without it is read."""
    with open(path, "rb") as fh:
        bom = fh.read(3) == b"\xef\xbb\xbf"
    if not bom:
        return sitk.ReadTransform(str(path))
    with tempfile.TemporaryDirectory(prefix="brainlobeseg-") as tmp:
        copy = os.path.join(tmp, "transform" + os.path.splitext(path)[1])
        with open(path, "rb") as src, open(copy, "wb") as dst:
            dst.write(src.read()[3:])
        return sitk.ReadTransform(copy)


def _binary_read_error(path: str, exc: Exception) -> InputError:
    """One line for an ``.h5``/``.mat`` file ITK cannot read: usually a cut copy, so the
    advice is to save or copy it again; ITK's own reason (the line naming its class, not
    its list of readers it tried) is kept in brackets."""
    kind = "MATLAB" if path.lower().endswith(".mat") else "HDF5"
    found = re.findall(r"ITK ERROR: \w+\(0x[0-9a-f]+\): (.*)", str(exc))
    reason = (found[0].strip() if found else type(exc).__name__)[:160]
    return InputError(f"cannot read the transform file {path}: the {kind} file is truncated, "
                      f"damaged or not an ITK transform ({reason}).",
                      "Save or copy the transform again, or give the .txt/.tfm file that ITK-SNAP saves.")


def read_transform(path: Optional[str], invert: bool = False) -> sitk.AffineTransform:
    """Read ``R`` (upright -> scan, LPS) from an ITK transform file.

    ``None`` means no transform: identity. ``invert=True`` is for files written the
    other way round (scan -> upright).
    """
    if path is None:
        return identity()
    if not os.path.isfile(path):
        if os.path.lexists(path):   # a link loop, a dangling link, a FIFO: named as such
            from .imageio import check_input_file
            check_input_file(path, "transform file")
        raise InputError(f"transform file not found: {path}.", "Check the path, or leave the transform out.")
    if os.path.getsize(path) == 0:
        raise InputError(f"transform file is empty: {path}.", "Save the transform again from ITK-SNAP.")
    check_itk_text(path)   # before ITK parses it: some malformed files crash ITK outright
    try:
        with captured_c_stderr():   # HDF5 prints ~25 lines for a cut .h5 before ITK raises
            raw = _read_itk(path)
    except Exception as exc:  # SimpleITK raises RuntimeError with ITK's text
        if path.lower().endswith(_BINARY_TRANSFORM_SUFFIXES):
            raise _binary_read_error(path, exc) from None
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read the transform file {path}: it is not an ITK transform "
                         f"({first[:160]}).",
                         "Give the .txt/.tfm file that ITK-SNAP saves (Transform: "
                         f"{_ITKSNAP_TYPE}).") from None
    tf = validate(raw, source=f"transform file {os.path.basename(path)}")
    return affine_from_matrix(np.linalg.inv(matrix_of(tf))) if invert else tf


def write_transform(path: str, transform: sitk.Transform) -> None:
    """Write ``transform`` as ITK-SNAP does (``MatrixOffsetTransformBase_double_3_3``).

    Written by hand rather than with ``sitk.WriteTransform`` so that the file has the
    exact type name ITK-SNAP uses; SimpleITK reads it back unchanged. Atomic: the
    file appears only when complete.
    """
    m = matrix_of(transform)
    params = list(m[:3, :3].ravel()) + list(m[:3, 3])
    text = ("#Insight Transform File V1.0\n#Transform 0\n"
            f"Transform: {_ITKSNAP_TYPE}\n"
            "Parameters: " + " ".join(repr(float(v)) for v in params) + "\n"
            "FixedParameters: 0 0 0\n")
    write_text_atomic(text, path)


def slicer_to_parent_ras(transform: sitk.Transform) -> np.ndarray:
    """4x4 RAS "to parent" matrix for a Slicer transform node that shows the scan upright."""
    return LPS_TO_RAS @ np.linalg.inv(matrix_of(transform)) @ LPS_TO_RAS


def from_slicer_to_parent_ras(to_parent_ras: np.ndarray) -> sitk.AffineTransform:
    """``R`` from a Slicer node's "to parent" RAS matrix (inverse of the function above)."""
    return affine_from_matrix(LPS_TO_RAS @ np.linalg.inv(np.asarray(to_parent_ras, float)) @ LPS_TO_RAS)


def rotation(angles_deg: Tuple[float, float, float], center=(0.0, 0.0, 0.0),
             translation=(0.0, 0.0, 0.0)) -> sitk.AffineTransform:
    """Head-pose transform from rotations about x, y, z (degrees) about ``center`` (LPS mm).

    Used to make tilted phantoms and synthetic cases with a known ``R``.
    """
    rx, ry, rz = (math.radians(a) for a in angles_deg)
    e = sitk.Euler3DTransform(tuple(float(c) for c in center), rx, ry, rz,
                              tuple(float(t) for t in translation))
    return affine_from_matrix(matrix_of(e))


def rotation_angle_deg(transform: sitk.Transform) -> float:
    """Angle of the rotation part (degrees): how far a pose is from upright."""
    u, _, vt = np.linalg.svd(matrix_of(transform)[:3, :3])
    return rotation_matrix_angle_deg(u @ vt)


def rotation_matrix_angle_deg(rotation: np.ndarray) -> float:
    """Angle (degrees) of a 3x3 rotation matrix, from its trace."""
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


# ----------------------------------------------------------------------------- rotation matrices

def rotation_taking(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation matrix taking unit vector ``a`` to unit vector ``b``."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if np.linalg.norm(v) < 1e-12:
        if c > 0:
            return np.eye(3)
        # opposite vectors: half a turn about any axis across them (-I would be a mirror)
        axis = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k * (1.0 / (1.0 + c))


def rotation_x(deg: float) -> np.ndarray:
    """Rotation matrix about the x (left-right) axis: the head's nod (pitch)."""
    t = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])


def pose_transform(rotation: np.ndarray, centre: np.ndarray) -> sitk.AffineTransform:
    """``R(p) = centre + rotation @ (p - centre)`` as a SimpleITK affine."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = centre - rotation @ centre
    return affine_from_matrix(m)


def nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation part of a linear map (polar decomposition).

    A head that is both turned and scaled along its own axes, ``U S``, gives back ``U``
    exactly, so a head larger or narrower than the reference does not bias the pose.
    """
    u, _, vt = np.linalg.svd(matrix)
    r = u @ vt
    if np.linalg.det(r) < 0:   # a reflection cannot be a head pose; keep it a rotation
        u[:, -1] *= -1
        r = u @ vt
    return r
