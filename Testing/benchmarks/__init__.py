"""Benchmarks of BrainLobeSeg (issue 5): ``python -m Testing.benchmarks.bench``."""
