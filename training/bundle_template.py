"""``python -m training bundle_template``: the upright reference head the engine ships.

The automatic alignment (:mod:`BrainLobeSegLib.alignment`) needs an upright head CT in
the frame the models are trained in, which is the MNI frame of the atlases that
``training synth`` labels from. The Rorden CT template (Clinical toolbox, BSD-2) is such
a head, and the only atlas file the project may ship (docs/DESIGN.md section 5.3):
downsampled to 2.5 mm, converted to HU (int16), with its licence and a SOURCE note.

This command rebuilds ``BrainLobeSeg/Resources/Atlas`` from the original file, so the
bundled copy can always be traced back and remade::

    python -m training bundle_template --atlas-dir atlas --out BrainLobeSeg/Resources/Atlas
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from BrainLobeSegLib import reference, transforms
from BrainLobeSegLib.errors import InputError

from .synth import AIR_HU, TEMPLATE, _read, cormack_to_hu

SPACING_MM = 2.5


def downsampled_template_hu(atlas_dir: Path) -> sitk.Image:
    """The Rorden template in HU on a 2.5 mm grid of the same extent (int16).

    Averaged (Gaussian, sigma half the new spacing) before resampling, so the coarse grid
    keeps the mean density instead of aliasing the skull.
    """
    src = _read(atlas_dir / TEMPLATE, "CT template")
    hu = sitk.GetImageFromArray(cormack_to_hu(sitk.GetArrayViewFromImage(src)))
    hu.CopyInformation(src)
    smooth = sitk.SmoothingRecursiveGaussian(hu, SPACING_MM / 2.0)
    extent = np.array(src.GetSize()) * np.array(src.GetSpacing())
    size = [int(n) for n in np.round(extent / SPACING_MM)]
    ref = sitk.Image(size, sitk.sitkInt16)
    ref.SetSpacing((SPACING_MM,) * 3)
    ref.SetDirection(src.GetDirection())
    ref.SetOrigin(src.TransformContinuousIndexToPhysicalPoint([-0.5 + SPACING_MM / 4.0] * 3))
    out = sitk.Resample(smooth, ref, transforms.identity(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return sitk.Cast(sitk.Round(out), sitk.sitkInt16)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlas-dir", type=Path, required=True,
                   help="atlas folder holding Clinical-scct/scct.nii.gz and LICENSE.txt (docs/DESIGN.md section 5.2)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write (the engine reads BrainLobeSeg/Resources/Atlas)")


def run(args: argparse.Namespace) -> int:
    licence = args.atlas_dir / "Clinical-scct" / "LICENSE.txt"
    if not licence.is_file():
        raise InputError(f"licence file missing: {licence}.",
                         "The template may only be shipped with its licence; restore Clinical-scct/.")
    image = downsampled_template_hu(args.atlas_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / reference.TEMPLATE_FILE
    sitk.WriteImage(image, str(path), True)
    shutil.copyfile(licence, args.out / reference.LICENSE_FILE)
    digest = hashlib.sha256((args.atlas_dir / TEMPLATE).read_bytes()).hexdigest()
    print(f"wrote {path} ({'x'.join(map(str, image.GetSize()))} at {SPACING_MM} mm, "
          f"{path.stat().st_size // 1024} KiB) from {TEMPLATE} (sha256 {digest[:16]}...)")
    return 0
