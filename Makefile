# `make test` and `make demo` do all set-up on a fresh machine: a virtualenv in .venv, the
# pinned build and test dependencies, and an editable build of the extension (C++ always; CUDA
# when nvcc is found and there is a GPU, for that GPU, or with CUDA=ON).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CUDA=AUTO|ON|OFF; CUDA_ARCHS empty: the local GPU's architecture (release set with CUDA=ON
# and no GPU). XLA_INCLUDE_DIR: FFI headers to build against instead of those of the oldest
# supported jaxlib, which the build downloads (needed offline; see README).
CUDA ?= AUTO
CUDA_ARCHS ?=
XLA_INCLUDE_DIR ?=
# Release wheels: every supported GPU architecture (when CUDA is built), into dist/.
WHEEL_CUDA_ARCHS ?= 80;90;100
BUILD_STAMP := $(VENV)/.jax_router-built
SOURCES := $(wildcard ffi/*) $(wildcard cmake/*) CMakeLists.txt pyproject.toml
CMAKE_DEFS := -Ccmake.define.JAX_ROUTER_CUDA=$(CUDA) \
	$(if $(XLA_INCLUDE_DIR),-Ccmake.define.JAX_ROUTER_XLA_INCLUDE_DIR="$(XLA_INCLUDE_DIR)")

.PHONY: all install test demo example bench wheel clean

all: test

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILD_STAMP): $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . $(CMAKE_DEFS) \
		$(if $(CUDA_ARCHS),-Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$(CUDA_ARCHS)")
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

# A wheel in dist/ (own build directory, so the editable build is left alone). CUDA=OFF gives a
# CPU-only wheel; otherwise the CUDA handlers are built for WHEEL_CUDA_ARCHS when nvcc is found.
wheel: $(VENV)/.deps
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist . $(CMAKE_DEFS) \
		-Cbuild-dir="build/wheel-{wheel_tag}" \
		$(if $(filter OFF,$(CUDA)),,-Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$(WHEEL_CUDA_ARCHS)")

clean:
	rm -rf build dist $(VENV)
