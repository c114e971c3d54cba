"""Slicer 5.8 embeds Python 3.9: the module and the engine must run there.

The suite itself runs on a newer Python, where 3.10+ syntax and library calls would
pass unnoticed. Two checks, both on every file Slicer loads (``BrainLobeSeg.py`` and
``BrainLobeSegLib``):

- the grammar: ``ast.parse(..., feature_version=(3, 9))`` refuses newer syntax
  (``match``, parenthesised context managers, ``except*``, ...);
- the library and language features: ``vermin --target=3.9-`` (in the ``test`` extra)
  finds calls and arguments that need a newer Python (``zip(strict=...)``,
  ``dataclass(slots=...)``, ``int.bit_count``, ``X | Y`` outside annotations, ...).

Each check is shown to fail on a 3.10 example, so it cannot pass by checking nothing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parent.parent / "BrainLobeSeg"
FILES = [MODULE_DIR / "BrainLobeSeg.py", *sorted((MODULE_DIR / "BrainLobeSegLib").glob("*.py"))]
NEWER = {
    "match.py": "def f(x):\n    match x:\n        case 1:\n            return 1\n",
    "zip.py": "pairs = list(zip([1], [2], strict=True))\n",
}


def vermin(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from vermin.main import main; sys.argv[0] = 'vermin'; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, "--target=3.9-", "--violations",
                           "--no-tips", *args], capture_output=True, text=True)


def test_every_file_parses_with_the_python_3_9_grammar():
    assert len(FILES) > 20
    for path in FILES:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
    with pytest.raises(SyntaxError):
        ast.parse(NEWER["match.py"], feature_version=(3, 9))


def test_vermin_finds_nothing_that_needs_more_than_python_3_9(tmp_path):
    pytest.importorskip("vermin", reason="vermin is in the 'test' extra: pip install -e '.[test]'")
    out = vermin(*map(str, FILES))
    assert out.returncode == 0, out.stdout + out.stderr
    for name, source in NEWER.items():
        (tmp_path / name).write_text(source, encoding="utf-8")
        assert vermin(str(tmp_path / name)).returncode != 0, name
