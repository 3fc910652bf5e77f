# The README's two commands: `make bench` and `make test`. Each sets up .venv first (once).
# torch is pinned (TORCH=...) so that the venv gets one known build; where pip resolves it to the CPU wheel the
# download is small, while a CUDA wheel is several GB. On a GPU machine use your own torch:
# `pip install -e ".[test,bench]"` in an environment that has it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0

.PHONY: setup test bench clean compile-check test-image-versions

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

# The offline GPU compile check, every case (CI runs a subset: tests/backends/triton/test_gpu_compile.py): each Triton kernel
# through its launcher for sm_90 and sm_80, and csrc/ through nvcc, no GPU needed. Rewrites the resource table.
# JOBS=N compiles in N processes; the raw records go to build/gpu_resources.json (`--from-json` re-tabulates them).
JOBS ?= 2
compile-check: setup
	mkdir -p build
	$(PY) tests/backends/triton/offline_compile.py --set full --jobs $(JOBS) --json build/gpu_resources.json \
		--table bench/results/gpu_resources.md

# The Triton tests under the interpreter with the GPU image's triton (3.6) and a numpy >= 2.4, next to the CPU
# torch, in a second venv; then the CI subset of the compile check with that triton. The image has numpy 2.5.2,
# which needs Python >= 3.12; the newest numpy for an older Python (2.4.x) breaks triton 3.6's interpreter the
# same way, so it stands in for it.
IMAGE_VENV ?= .venv-image
IMAGE_PY := $(IMAGE_VENV)/bin/python
IMAGE_TRITON ?= triton==3.6.0
IMAGE_NUMPY ?= numpy>=2.4
test-image-versions: $(IMAGE_VENV)/.installed
	TRITON_INTERPRET=1 $(IMAGE_PY) -m pytest -q tests/backends/triton tests/ops/test_hyper_linear.py

$(IMAGE_VENV)/.installed:
	$(PYTHON) -m venv $(IMAGE_VENV)
	echo '*' > $(IMAGE_VENV)/.gitignore
	$(IMAGE_PY) -m pip install --quiet --upgrade pip
	$(IMAGE_PY) -m pip install --quiet "$(TORCH)" "$(IMAGE_TRITON)" "$(IMAGE_NUMPY)" pytest
	touch $@

clean:
	rm -rf $(VENV) $(IMAGE_VENV) build *.egg-info hyperkernels/_cuda*.so
