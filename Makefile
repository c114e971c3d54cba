# Developer shortcuts. `make bench ATLAS=atlas` adds the atlas baseline (the atlas folder
# is laid out as docs/DESIGN.md section 5.2 describes);
# BENCH_ARGS passes more options (see `python -m Testing.benchmarks.bench --help`),
# e.g. BENCH_ARGS="--modes 3d --repeat 3" or BENCH_ARGS="--tiny-models".
PYTHON ?= python
ATLAS ?=
BENCH_ARGS ?=
# Slicer 5.8 ships Python 3.9 and numpy 1.26 (Testing/test_python39.py checks the syntax in
# the normal suite). `make test-numpy126` runs the engine and MRML tests with numpy 1.26.4
# in a throwaway venv that takes everything else from this interpreter's site-packages.
NUMPY126_VENV ?= /tmp/brainlobeseg-numpy126
ENGINE_MRML_TESTS = Testing/test_engine.py Testing/test_cleanup.py Testing/test_slicer_logic.py \
	Testing/test_slicer_tools.py Testing/test_panel.py Testing/test_module.py Testing/test_terminology.py

.PHONY: bench test test-numpy126 demo walkthrough

bench:
	BENCH_COMMAND="make bench$(if $(ATLAS), ATLAS=$(ATLAS))$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" \
	$(PYTHON) -m Testing.benchmarks.bench $(if $(ATLAS),--atlas-dir $(ATLAS)) $(BENCH_ARGS)

test:
	$(PYTHON) -m pytest -q

test-numpy126:
	$(PYTHON) -m venv --system-site-packages $(NUMPY126_VENV)
	$(NUMPY126_VENV)/bin/pip install -q numpy==1.26.4
	$(NUMPY126_VENV)/bin/python -c "import numpy; assert numpy.__version__ == '1.26.4', numpy.__version__"
	PYTHONPATH=$(CURDIR)/BrainLobeSeg:$(CURDIR) $(NUMPY126_VENV)/bin/python -m pytest -q $(ENGINE_MRML_TESTS)

demo:
	$(PYTHON) -m BrainLobeSegLib.cli demo -o demo-output

# Every shell block of README.md and training/README.md, in order, with tiny sizes, in a
# fresh copy of the repository and its own venv (a few minutes); ATLAS=DIR uses a real
# atlas folder for `synth`, otherwise a small fake one. See Testing/walkthrough.py.
walkthrough:
	$(PYTHON) -m Testing.walkthrough $(if $(ATLAS),--atlas $(ATLAS))
