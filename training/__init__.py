"""Training tree of BrainLobeSeg: dataset synthesis, training, evaluation, export.

Run as ``python -m training <command>``; each command is a module here exposing
``add_arguments(parser)`` and ``run(args) -> int`` (see :mod:`training.__main__`).
Training may use more than the engine (scipy, matplotlib, ...), never the other way
round: nothing in ``BrainLobeSegLib`` imports this package.
"""
