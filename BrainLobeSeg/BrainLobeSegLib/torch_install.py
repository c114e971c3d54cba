"""Finding and installing PyTorch inside 3D Slicer (no Qt here; the Widget asks first).

Slicer does not ship PyTorch. The preferred installer is the PyTorch extension's
``PyTorchUtils`` module (it picks a build that matches the GPU driver); without it,
``slicer.util.pip_install`` is used, and on a machine without an NVIDIA GPU the CPU-only
wheel index is named explicitly, because the default Linux/Windows wheel bundles CUDA
libraries (gigabytes) that such a machine cannot use.

The functions take the installers as arguments so that the decisions are testable
without Slicer.
"""

from __future__ import annotations

import importlib
import logging
import platform
import shutil
import subprocess
from typing import Callable, List, Optional, Sequence

from .errors import InputError

#: PyTorch's CPU-only wheel index (Linux and Windows).
CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"


def torch_available() -> bool:
    """True if ``import torch`` works (a half-installed torch counts as missing)."""
    try:
        importlib.import_module("torch")
    except Exception:
        return False
    return True


def nvidia_gpu_present(timeout_s: float = 5.0) -> bool:
    """True if ``nvidia-smi -L`` lists a GPU. Checked without torch, which is missing."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def pytorch_utils_logic():
    """The PyTorch extension's ``PyTorchUtilsLogic`` (the preferred installer), or None
    when that extension is not installed and pip is used instead."""
    try:
        import PyTorchUtils
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


def install_without_asking() -> bool:
    """Install torch with the PyTorch extension without asking (self-tests on CI
    machines, as other extensions' tests do); True if torch imports afterwards. A
    failure is logged; without the extension nothing is installed."""
    installer = pytorch_utils_logic()
    try:
        if installer is not None:
            installer.installTorch(askConfirmation=False)
    except Exception as exc:
        logging.warning("BrainLobeSeg: PyTorch could not be installed (%s)", exc)
    importlib.invalidate_caches()
    return torch_available()


def pip_arguments(gpu: bool, system: Optional[str] = None) -> List[str]:
    """``pip install`` arguments for torch: the CPU-only index when there is no GPU.

    macOS wheels are CPU/MPS builds already, so the default index is used there.
    """
    system = system or platform.system()
    if gpu or system == "Darwin":
        return ["torch"]
    return ["torch", "--index-url", CPU_INDEX_URL]


def install_torch(pip_install: Callable[[Sequence[str]], object],
                  pytorch_utils_logic: object = None, gpu: Optional[bool] = None) -> None:
    """Install torch with PyTorchUtils when given, else with ``pip_install``.

    The caller has already asked the user, so PyTorchUtils is told not to ask again.
    Raises :class:`InputError` when the installer reports failure.
    """
    gpu = nvidia_gpu_present() if gpu is None else gpu
    if pytorch_utils_logic is not None:
        torch = pytorch_utils_logic.installTorch(askConfirmation=False,
                                                 forceComputationBackend=None if gpu else "cpu")
        if torch is None:
            raise InputError("PyTorch was not installed.",
                             "Install it from the PyTorch Utils module, then try again.")
        return
    pip_install(pip_arguments(gpu))
    importlib.invalidate_caches()
    if not torch_available():
        raise InputError("PyTorch was installed but cannot be imported.",
                         "Restart 3D Slicer and try again.")
