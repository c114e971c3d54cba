"""``python -m training bundle_template``: the upright reference head the engine ships.

The automatic alignment (:mod:`BrainLobeSegLib.alignment`) needs an upright head CT in
the frame the models are trained in, which is the MNI frame of the atlases that
``training synth`` labels from. The Rorden CT template (Clinical toolbox, BSD-2) is such
a head, and the only atlas file the project may ship (docs/DESIGN.md section 5.3):
downsampled to 2.5 mm, converted to HU (int16), with its licence and a SOURCE note.

The alignment's second stage compares the regions a model finds with where they lie in
that frame: the centroid of each of the 20 aspects-on-cta masks (MIT), clipped to the
template's intracranial space as ``training synth`` clips its labels. Those 60 numbers are
shipped as ``region-centroids.json`` (the masks themselves are not).

This command rebuilds ``BrainLobeSeg/Resources/Atlas`` from the original files, so the
bundled copies can always be traced back and remade::

    python -m training bundle_template --atlas-dir atlas --out BrainLobeSeg/Resources/Atlas
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from BrainLobeSegLib import reference, transforms
from BrainLobeSegLib.errors import InputError

from .synth import AIR_HU, ICV_THRESHOLD, TEMPLATE, _read, cormack_to_hu, load_atlas

SPACING_MM = 2.5

#: The licence of the aspects-on-cta masks, from which ``region-centroids.json`` is derived.
MIT_LICENSE = """MIT License

Copyright (c) 2023 AnotherMak

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


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


def region_centroids(atlas_dir: Path) -> dict:
    """Centroid (LPS mm, MNI frame) of each region of the atlas's label map, counting
    only voxels inside the intracranial space (the labels ``training synth`` trains on)."""
    atlas = load_atlas(str(atlas_dir))
    icv = sitk.Resample(atlas.icv, atlas.labels, transforms.identity(), sitk.sitkLinear, 0.0)
    labels = sitk.GetArrayFromImage(atlas.labels)
    labels[sitk.GetArrayViewFromImage(icv) <= ICV_THRESHOLD] = 0
    out = {}
    for label in range(1, int(labels.max()) + 1):
        index = np.argwhere(labels == label)[:, ::-1].mean(axis=0)   # (x, y, z) voxel index
        point = atlas.labels.TransformContinuousIndexToPhysicalPoint([float(v) for v in index])
        out[str(label)] = [round(float(v), 2) for v in point]
    return out


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
    centroids = args.out / reference.CENTROIDS_FILE
    centroids.write_text(json.dumps({
        "format": 1, "frame": "MNI152, LPS millimetres (the models' upright frame)",
        "source": "aspects-on-cta region masks (MIT, github.com/AnotherMak/aspects-on-cta), "
                  "clipped to the Rorden template's intracranial space (grey + white + CSF "
                  f"prior > {ICV_THRESHOLD})",
        "centroids": region_centroids(args.atlas_dir)}, indent=1) + "\n")
    (args.out / reference.CENTROIDS_LICENSE_FILE).write_text(MIT_LICENSE)
    digest = hashlib.sha256((args.atlas_dir / TEMPLATE).read_bytes()).hexdigest()
    print(f"wrote {path} ({'x'.join(map(str, image.GetSize()))} at {SPACING_MM} mm, "
          f"{path.stat().st_size // 1024} KiB) from {TEMPLATE} (sha256 {digest[:16]}...)")
    return 0
