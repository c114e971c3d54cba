"""``python -m training <command>``: one entry point for the training tree.

Each command lives in its own module (``training/<command>.py``) that exposes
``add_arguments(parser)`` and ``run(args) -> int``; adding a command is adding a
module and a line to :data:`COMMANDS`. A command whose module cannot be imported (a
missing optional dependency) stays listed and explains why when chosen, so the other
commands keep working.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Dict, Optional, Sequence, Union

from BrainLobeSegLib.console import quiet_on_closed_pipe, use_help_formatter
from BrainLobeSegLib.errors import EXIT_INPUT_ERROR, InputError

#: command -> one-line help (the module is ``training.<command>``).
COMMANDS: Dict[str, str] = {
    "synth": "make labelled synthetic head CTs from the public MNI atlases",
    "train": "train the planar and 3D U-Nets on dataset folders",
    "evaluate": "score models on a labelled dataset folder",
    "export": "turn a training run into a model folder",
    "bundle_template": "rebuild the upright reference head CT the engine ships (alignment)",
    "aspects_fit": "fit the ASPECTS read-out card on aspects_bench.py --dump records",
}


def _load(command: str) -> Union[ModuleType, str, None]:
    """The command's module, the import error as text, or None if there is no module."""
    name = f"{__package__ or 'training'}.{command}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        return f"{type(exc).__name__}: {exc}"
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"


def _unavailable(command: str, reason: str):
    def run(args: argparse.Namespace) -> int:
        print(f"training {command}: cannot be used here ({reason}). Install the training "
              "requirements (pip install -e .[train]).", file=sys.stderr)
        return 1
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=(
        "Dataset synthesis, training, evaluation and export for BrainLobeSeg."))
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in COMMANDS.items():
        module = _load(command)
        if module is None:
            continue
        p = sub.add_parser(command, help=help_text, description=help_text)
        if isinstance(module, str):
            p.set_defaults(func=_unavailable(command, module))
            continue
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return use_help_formatter(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m training``; quiet when the reader of its output goes away."""
    return quiet_on_closed_pipe(lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"training {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"training {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
