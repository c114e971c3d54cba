"""BrainLobeSeg engine: the 20 ASPECTS regions on non-contrast head CT.

Plain Python (numpy, SimpleITK, torch), importable inside 3D Slicer and outside it.
Modules, each with one job:

- :mod:`regions`      the label table (ids, names, colours, terminology)
- :mod:`transforms`   the transform convention (upright <-> scan) and ITK-SNAP files
- :mod:`imageio`      reading and checking scans, atomic writing
- :mod:`geometry`     upright resampling, cropping, mapping labels back to the scan
- :mod:`networks`     the U-Net architectures
- :mod:`modes`       segmentation modes and the default (torch-free)
- :mod:`models`       model folders: ``model.json`` card, safe weight loading
- :mod:`inference`    planar / 3D / ensemble prediction and probability fusion
- :mod:`output`       label maps and Slicer ``.seg.nrrd`` files
- :mod:`phantom`      synthetic head phantoms for tests and the demo
- :mod:`cli`          the ``brainlobeseg`` command
"""

__version__ = "0.1.0"
