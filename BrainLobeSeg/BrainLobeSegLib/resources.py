"""Where the extension's bundled files are, in Slicer, a source checkout and a wheel.

In Slicer and in a source checkout (editable install) they sit in the extension's
``Resources`` folder next to this package; a wheel cannot carry files outside the package,
so pyproject.toml copies them into it (``bundled_models``, ``bundled_atlas``). An
environment variable can point elsewhere (tests, other model sets).
"""

from __future__ import annotations

import os
from pathlib import Path


def bundled_dir(env_var: str, resources_name: str, package_name: str) -> Path:
    """``$env_var``, else ``Resources/<resources_name>`` beside the package, else the
    wheel's copy ``BrainLobeSegLib/<package_name>``."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    resources = here.parent / "Resources" / resources_name
    return resources if resources.is_dir() else here / package_name
