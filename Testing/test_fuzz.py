"""Bounded property-based fuzzing of the readers that take files from users (issue 6).

Property: whatever the bytes, a reader either returns something valid or raises
:class:`InputError` -- never another exception (which the CLI would report as an
internal error, and Slicer as a traceback), never a hang, never a crash.

- :func:`transforms.read_transform`: random text, random bytes, and ITK-SNAP-shaped
  files with random numbers (NaN, inf, huge, tiny, singular, wrong counts, other
  transform types). "Valid" = a 3D :class:`sitk.AffineTransform` with a finite,
  well-conditioned, invertible matrix.
- ``dataset.read_case``: random folder contents and label values (see the bottom).

Bounded (``max_examples`` 40-80, no deadline) so the whole file runs in a few seconds
in CI; hypothesis' database is off so runs do not depend on earlier ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from BrainLobeSegLib import transforms
from BrainLobeSegLib.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::BrainLobeSegLib.transforms.TransformWarning")
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


_REASONS = ("is empty", "not an ITK transform", "not a linear transform", "not 3D", "NaN",
            "moves the image", "is singular", "scales the image")


def check_transform_file(data: bytes, invert: bool) -> str:
    """The property, for one file's bytes; returns the outcome (for hypothesis' statistics)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_bytes(data)
        try:
            tf = transforms.read_transform(str(path), invert=invert)
        except InputError as exc:
            assert str(exc).strip() and "\n" not in str(exc)
            return "refused: " + next((k for k in _REASONS if k in exc.problem), "other")
    assert isinstance(tf, sitk.AffineTransform) and tf.GetDimension() == 3
    m = transforms.matrix_of(tf)
    assert np.all(np.isfinite(m))
    sv = np.linalg.svd(m[:3, :3], compute_uv=False)
    assert sv.min() > 1e-3 and np.isfinite(np.linalg.inv(m)).all()
    return "valid affine"


# numbers as a user's file might hold them: ordinary, huge, tiny, non-finite, odd spellings
_special = st.sampled_from(["nan", "NaN", "inf", "-inf", "1e308", "-1e308", "1e-320", "0", "-0",
                            "1e999", "0x10", "1,5", "", "--1", "1e", "+.5", "9" * 400])
_moderate = st.one_of(st.floats(min_value=-2.0, max_value=2.0).map(lambda v: f"{v:.17g}"),
                      st.sampled_from(["0", "1", "-1", "0.5", "1e-4"]))
_weird = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.integers(min_value=-10**30, max_value=10**30).map(str), _special)
#: ITK transform type -> (parameter count, fixed parameter count) it expects
_TYPES = {
    "MatrixOffsetTransformBase_double_3_3": (12, 3), "AffineTransform_double_3_3": (12, 3),
    "AffineTransform_float_3_3": (12, 3), "Euler3DTransform_double_3_3": (6, 3),
    "VersorRigid3DTransform_double_3_3": (6, 3), "ScaleTransform_double_3_3": (3, 3),
    "TranslationTransform_double_3_3": (3, 0), "Similarity3DTransform_double_3_3": (7, 3),
    "AffineTransform_double_2_2": (6, 2), "BSplineTransform_double_3_3": (24, 18),
    "IdentityTransform_double_3_3": (0, 0), "NoSuch_double_3_3": (12, 3)}


@st.composite
def itk_files(draw) -> bytes:
    """ITK transform files, mostly well-formed around random numbers."""
    kind = draw(st.sampled_from(sorted(_TYPES)))
    n_params, n_fixed = _TYPES[kind]
    if draw(st.integers(0, 4)) == 0:   # sometimes the wrong counts
        n_params, n_fixed = draw(st.integers(0, 15)), draw(st.integers(0, 4))
    mode = draw(st.sampled_from(["plausible", "one odd number", "any numbers"]))
    pool = _weird if mode == "any numbers" else _moderate
    params = draw(st.lists(pool, min_size=n_params, max_size=n_params))
    fixed = draw(st.lists(_moderate, min_size=n_fixed, max_size=n_fixed))
    if mode == "one odd number" and params:
        params[draw(st.integers(0, len(params) - 1))] = draw(_weird)
    lines = ["#Insight Transform File V1.0", "#Transform 0", f"Transform: {kind}",
             "Parameters: " + " ".join(params), "FixedParameters: " + " ".join(fixed)]
    if draw(st.integers(0, 5)) == 0:   # a line dropped, or the order shuffled
        lines = draw(st.permutations(lines))[: draw(st.integers(1, len(lines)))]
    return ("\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n", "\n\n\x00"]))).encode(
        "utf-8", "surrogatepass")


@st.composite
def near_rotations(draw) -> bytes:
    """Valid-looking poses: a rotation, perturbed a little or a lot, with a translation."""
    angles = [draw(st.floats(-180, 180)) for _ in range(3)]
    m = transforms.matrix_of(transforms.rotation(tuple(angles)))[:3, :3]
    noise = draw(st.sampled_from([0.0, 1e-6, 0.1, 1.0, 100.0]))
    m = m + noise * np.array([[draw(st.floats(-1, 1)) for _ in range(3)] for _ in range(3)])
    reach = draw(st.sampled_from([300.0] * 5 + [1e6]))   # sometimes far beyond any scanner
    t = [draw(st.floats(-reach, reach)) for _ in range(3)]
    text = ("#Insight Transform File V1.0\n#Transform 0\n"
            "Transform: MatrixOffsetTransformBase_double_3_3\nParameters: "
            + " ".join(repr(float(v)) for v in list(m.ravel()) + t) + "\nFixedParameters: "
            + " ".join(repr(draw(st.floats(-500, 500))) for _ in range(3)) + "\n")
    return text.encode()


@FUZZ
@given(data=itk_files(), invert=st.booleans())
def test_fuzz_transform_reader_itk_shaped(data, invert):
    event(check_transform_file(data, invert))


@FUZZ
@given(data=near_rotations(), invert=st.booleans())
def test_fuzz_transform_reader_poses(data, invert):
    event(check_transform_file(data, invert))


@settings(max_examples=40, deadline=None, database=None)
@given(data=st.one_of(st.binary(max_size=600), st.text(max_size=400).map(
    lambda s: s.encode("utf-8", "surrogatepass"))), invert=st.booleans())
def test_fuzz_transform_reader_random_content(data, invert):
    event(check_transform_file(data, invert))


def test_fuzz_found_cases_stay_fixed(tmp_path):
    """Examples the fuzzing above has found or must keep covering, run every time."""
    for params in (["1e308"] * 12, ["1e-320"] * 12, ["1"] * 9 + ["1e300", "0", "0"],
                   ["nan"] + ["0"] * 11, ["9" * 400] * 12):
        check_transform_file(("#Insight Transform File V1.0\n#Transform 0\nTransform: "
                              "MatrixOffsetTransformBase_double_3_3\nParameters: "
                              + " ".join(params) + "\nFixedParameters: 0 0 0\n").encode(), False)


# --------------------------------------------------------------------------- every ITK type, in a subprocess

#: Every transform type ITK's reader in SimpleITK can create (its transform factory's
#: ``CreateObjectFunction`` instantiations in ``_SimpleITK*.so``, SimpleITK 2.5), plus
#: names that appear in ITK files elsewhere. :func:`test_type_list_covers_simpleitk`
#: fails when a newer SimpleITK knows a name that is not here.
ITK_TYPE_NAMES = (
    "AffineTransform", "AzimuthElevationToCartesianTransform", "BSplineTransform",
    "BSplineDeformableTransform", "BSplineSmoothingOnUpdateDisplacementFieldTransform",
    "CenteredAffineTransform", "CenteredEuler3DTransform", "CenteredRigid2DTransform",
    "CenteredSimilarity2DTransform", "ComposeScaleSkewVersor3DTransform", "CompositeTransform",
    "ConstantVelocityFieldTransform", "DisplacementFieldTransform", "Euler2DTransform",
    "Euler3DTransform", "FixedCenterOfRotationAffineTransform",
    "GaussianExponentialDiffeomorphicTransform", "GaussianSmoothingOnUpdateDisplacementFieldTransform",
    "GaussianSmoothingOnUpdateTimeVaryingVelocityFieldTransform", "IdentityTransform",
    "KernelTransform", "MatrixOffsetTransformBase", "QuaternionRigidTransform", "Rigid2DTransform",
    "Rigid3DPerspectiveTransform", "Rigid3DTransform", "ScalableAffineTransform",
    "ScaleLogarithmicTransform", "ScaleSkewVersor3DTransform", "ScaleTransform",
    "ScaleVersor3DTransform", "Similarity2DTransform", "Similarity3DTransform",
    "ThinPlateSplineKernelTransform", "TimeVaryingBSplineVelocityFieldTransform",
    "TimeVaryingVelocityFieldTransform", "TranslationTransform", "VelocityFieldTransform",
    "VersorRigid3DTransform", "VersorTransform")


def test_type_list_covers_simpleitk():
    """The sweep below tests every transform type this SimpleITK's reader can create."""
    import mmap
    import re
    import glob
    import os
    libs = glob.glob(os.path.join(os.path.dirname(sitk.__file__), "_SimpleITK*"))
    assert libs, "SimpleITK's library not found"
    with open(libs[0], "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        known = {m.decode() for m in re.findall(rb"CreateObjectFunctionINS_\d+(\w+?Transform)I[df]", data)}
    assert len(known) > 25, known
    assert known <= set(ITK_TYPE_NAMES), sorted(known - set(ITK_TYPE_NAMES))


_SWEEP = """
import sys, tempfile, os
sys.path[:0] = {paths!r}
import test_fuzz
test_fuzz.sweep_types(sys.argv[1])
"""


def _sweep_files():
    """(label, text): every type, double/float, 3D and 2D, 0..20 parameters and 0..20
    fixed parameters, alone and inside a composite."""
    for name in ITK_TYPE_NAMES:
        for kind in (f"{name}_double_3_3", f"{name}_float_3_3", f"{name}_double_2_2"):
            fixed_counts = range(21) if kind.endswith("double_3_3") else (0, 2, 3, 4)
            for n in range(21):
                for f in fixed_counts:
                    body = (f"Transform: {kind}\nParameters: {' '.join(['0.5'] * n)}\n"
                            f"FixedParameters: {' '.join(['0'] * f)}\n")
                    yield f"{kind} {n}/{f}", "#Insight Transform File V1.0\n#Transform 0\n" + body
                    if f in (0, 3, 4) and kind.endswith("double_3_3"):
                        yield f"composite {kind} {n}/{f}", (
                            "#Insight Transform File V1.0\n#Transform 0\n"
                            "Transform: CompositeTransform_double_3_3\n#Transform 1\n" + body)


def sweep_types(progress: str) -> None:
    """Run in a subprocess: read every file of :func:`_sweep_files`; each must give a
    valid affine or an InputError. The label of the file being read is written to
    ``progress`` first, so a crash names its cause."""
    import warnings
    warnings.simplefilter("ignore")
    outcomes = {"valid affine": 0}
    with tempfile.TemporaryDirectory() as tmp, open(progress, "w") as log:
        path = Path(tmp) / "t.txt"
        for label, text in _sweep_files():
            log.write(label + "\n")
            log.flush()
            path.write_text(text, encoding="utf-8")   # a new file: truncating one is slow
            try:
                transforms.read_transform(str(path))
                outcomes["valid affine"] += 1
            except InputError as exc:
                assert str(exc).strip() and "\n" not in str(exc), (label, str(exc))
                outcomes["refused"] = outcomes.get("refused", 0) + 1
            path.unlink()
    print(outcomes)


def test_every_itk_type_and_count_never_crashes(tmp_path):
    """Issue 14: a CenteredAffineTransform with an empty Parameters line crashed the
    process (exit 139). Every type name, 0..20 parameters and fixed parameters, in a
    subprocess: it must end normally, with each file read or refused in one line."""
    import subprocess
    import sys
    progress = tmp_path / "progress.txt"
    here = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", _SWEEP.format(paths=[here] + sys.path), str(progress)],
                          capture_output=True, text=True, timeout=600)
    last = progress.read_text().splitlines()[-1:] if progress.exists() else []
    assert proc.returncode == 0, f"crashed ({proc.returncode}) at {last}: {proc.stderr[-2000:]}"
    assert "valid affine" in proc.stdout and "refused" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- dataset reader

_LABEL_DTYPES = [np.uint8, np.int16, np.int32, np.uint16, np.float32, np.float64]


def _small_image(draw, shape, dtype, values) -> sitk.Image:
    arr = np.zeros(shape, dtype)
    flat = arr.reshape(-1)
    for i, v in enumerate(values):
        flat[(i * 7919) % flat.size] = v
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 3.0))
    return img


@st.composite
def dataset_folders(draw) -> dict:
    """File name -> bytes or image for one random dataset folder around case ``1``."""
    shape = tuple(draw(st.integers(2, 6)) for _ in range(3))
    files: dict = {}
    ct_kind = draw(st.sampled_from(["ct"] * 8 + ["bytes", "empty", "cut", "2d", "4d", "vector"]))
    ct = _small_image(draw, shape, np.int16, [-1000, 40, 1200])
    files["1.nii.gz"] = {"ct": ct, "cut": ct, "bytes": None, "empty": None,
                         "2d": sitk.GetImageFromArray(np.zeros(shape[:2], np.int16)),
                         "4d": sitk.JoinSeries([ct, ct]),
                         "vector": sitk.GetImageFromArray(np.zeros(shape + (2,), np.int16), True)
                         }[ct_kind]
    if ct_kind == "bytes":
        files["1.nii.gz"] = draw(st.binary(max_size=300))
    elif ct_kind == "empty":
        files["1.nii.gz"] = b""
    seg_kind = draw(st.sampled_from(["labels"] * 5 + ["none", "bytes", "cut", "other grid",
                                                      "other grid"]))
    if seg_kind != "none":
        dtype = draw(st.sampled_from(_LABEL_DTYPES))
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            value = st.integers(int(max(info.min, -70000)), int(min(info.max, 70000)))
        else:
            value = st.floats(allow_nan=True, allow_infinity=True, width=32)
        values = draw(st.lists(st.one_of(st.integers(0, 20), value), max_size=6))
        seg = _small_image(draw, shape, dtype, values)
        seg.CopyInformation(ct)
        if seg_kind == "other grid":
            seg.SetOrigin((draw(st.floats(-5, 5)), 0.0, 0.0))
            seg.SetSpacing((2.0, draw(st.sampled_from([2.0, 2.5])), 3.0))
        files["1-seg" + draw(st.sampled_from([".nii.gz", ".nii"]))] = (
            draw(st.binary(max_size=200)) if seg_kind == "bytes" else seg)
        if seg_kind == "cut":
            files["CUT"] = True
    tf_kind = draw(st.sampled_from(["none", "none", "pose", "pose", "itk", "bytes"]))
    if tf_kind != "none":
        files["1.txt"] = draw({"pose": near_rotations(), "itk": itk_files(),
                               "bytes": st.binary(max_size=100)}[tf_kind])
    junk_names = st.sampled_from(["1.nii", "2-seg.nii.gz", ".partial-9.nii.gz", "notes.txt",
                                  "1.nii.gz.bak", "3.nii"])
    for junk in draw(st.lists(junk_names, max_size=2, unique=True)) if draw(st.integers(0, 3)) == 0 else []:
        files[junk] = draw(st.binary(max_size=64))
    if ct_kind == "cut":
        files["CUT_CT"] = True
    return files


def _materialise(folder: Path, files: dict) -> None:
    for name, content in files.items():
        if name.startswith("CUT"):
            continue
        path = folder / name
        if isinstance(content, sitk.Image):
            sitk.WriteImage(content, str(path), useCompression=name.endswith(".gz"))
        else:
            path.write_bytes(content)
    targets = []
    if files.get("CUT_CT"):
        targets.append(folder / "1.nii.gz")
    if files.get("CUT"):
        targets += [p for p in folder.glob("1-seg.nii*")]
    for path in targets:
        data = path.read_bytes()
        path.write_bytes(data[: max(1, len(data) * 2 // 3)])


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files=dataset_folders(), invert=st.booleans())
def test_fuzz_dataset_reader(files, invert):
    """list_cases + read_case on random folder contents: valid cases or InputError."""
    dataset = pytest.importorskip("BrainLobeSegLib.dataset")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _materialise(folder, files)
        try:
            cases = dataset.list_cases(folder)
            results = [dataset.read_case(c, invert_transform=invert) for c in cases]
        except InputError as exc:
            assert str(exc).strip() and "\n" not in str(exc)
            event("refused: " + next((k for k in ("transform", "not label ids", "not on the grid",
                                                  "truncated", "NaN", "cannot read", "empty",
                                                  "files (", "3D volume", "values per voxel")
                                      if k in str(exc)), "other"))
            return
    event("valid")
    for ct, tf, seg in results:
        assert ct.GetDimension() == 3 and ct.GetNumberOfComponentsPerPixel() == 1
        assert isinstance(tf, sitk.AffineTransform)
        if seg is not None:
            arr = sitk.GetArrayViewFromImage(seg)
            assert seg.GetPixelID() == sitk.sitkUInt8 and arr.max() <= 20
            assert seg.GetSize() == ct.GetSize()
            np.testing.assert_allclose(seg.GetOrigin(), ct.GetOrigin(), atol=1e-3)
            np.testing.assert_allclose(seg.GetSpacing(), ct.GetSpacing(), atol=1e-3)
