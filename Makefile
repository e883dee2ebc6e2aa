# `make test` and `make demo` do all set-up on a fresh machine: a virtualenv in .venv, the
# pinned build and test dependencies, and an editable build of the extension (C++ always,
# CUDA whenever nvcc is found).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA ?= AUTO
CUDA_ARCHS ?= 90
BUILD_STAMP := $(VENV)/.jax_router-built
SOURCES := $(wildcard ffi/*) CMakeLists.txt pyproject.toml

.PHONY: all install test demo example bench clean

all: test

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILD_STAMP): $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . \
		-Ccmake.define.JAX_ROUTER_CUDA=$(CUDA) \
		-Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$(CUDA_ARCHS)"
	touch $@

install: $(BUILD_STAMP)

# The suite runs on all cores (pytest-xdist); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
test: $(BUILD_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

demo: $(BUILD_STAMP)
	$(PY) examples/demo.py

# NNX MoE block trained data-parallel; preset by backend (small on CPU), --plot writes a PNG.
example: $(BUILD_STAMP)
	$(PY) examples/moe_nnx.py --plot

bench: $(BUILD_STAMP)
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf build $(VENV)
