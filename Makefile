# The README's two commands: `make bench` and `make test`. Each sets up .venv first (once).
# On this project's CPU machines `pip install torch==2.13.0` takes the CPU build that lies on disk;
# an unpinned torch would pull several GB of CUDA wheels. On a GPU machine use your own torch:
# `pip install -e ".[test,bench]"` in an environment that has it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0

.PHONY: setup test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info hyperkernels/_cuda*.so
