# Developer shortcuts. `make bench ATLAS=atlas` adds the atlas baseline (the atlas folder
# is laid out as docs/DESIGN.md section 5.2 describes);
# BENCH_ARGS passes more options (see `python -m Testing.benchmarks.bench --help`),
# e.g. BENCH_ARGS="--modes 3d --repeat 3" or BENCH_ARGS="--tiny-models".
PYTHON ?= python
ATLAS ?=
BENCH_ARGS ?=

.PHONY: bench test demo walkthrough

bench:
	BENCH_COMMAND="make bench$(if $(ATLAS), ATLAS=$(ATLAS))$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" \
	$(PYTHON) -m Testing.benchmarks.bench $(if $(ATLAS),--atlas-dir $(ATLAS)) $(BENCH_ARGS)

test:
	$(PYTHON) -m pytest -q

demo:
	$(PYTHON) -m BrainLobeSegLib.cli demo -o demo-output

# Every shell block of README.md and training/README.md, in order, with tiny sizes, in a
# fresh copy of the repository and its own venv (a few minutes); ATLAS=DIR uses a real
# atlas folder for `synth`, otherwise a small fake one. See Testing/walkthrough.py.
walkthrough:
	$(PYTHON) -m Testing.walkthrough $(if $(ATLAS),--atlas $(ATLAS))
