"""The router implementations a test can run on, found from this machine.

One test body runs over every implementation present (the ``impl`` / ``kernel_impl`` fixtures
of tests/conftest.py parametrize over them):

- ``xla``:  pure JAX (``implementation="xla"``) on JAX's default device;
- ``cpu``:  the C++ kernels (``implementation="ffi"``) on a CPU device. JAX always has a CPU
  backend, so a GPU machine runs these too;
- ``cuda``: the CUDA kernels (``implementation="ffi"``) on a CUDA GPU.

An ``Impl`` names the device it runs on and the ``implementation=`` value it passes. The
fixtures make its device JAX's default device for the whole test, so arrays the body creates
live there and everything it computes runs there; ``put`` / ``call`` / ``jit`` place inputs
explicitly, for code that compares two implementations in one test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import numpy as np

import jax_router as jr
from jax_router import _ffi

# Set to 1 (or pass --require-gpu to pytest) to make a missing CUDA device or missing CUDA
# kernels an error instead of a skip: a GPU run can then not pass by skipping.
REQUIRE_GPU_ENV = "JAX_ROUTER_REQUIRE_GPU"

NAMES = ("xla", "cpu", "cuda")
KERNEL_NAMES = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str  # "xla" | "cpu" | "cuda"
    device: Any  # the jax.Device it runs on
    implementation: str  # the implementation= value passed to the public functions

    @property
    def kernels(self) -> bool:
        """True for the FFI kernels (cpu, cuda), False for pure JAX."""
        return self.implementation == "ffi"

    def __str__(self) -> str:
        return self.name

    @contextlib.contextmanager
    def on_device(self):
        """Makes this implementation's device JAX's default device inside the block."""
        with jax.default_device(self.device):
            yield self

    def put(self, tree):
        """``tree`` with every concrete array (numpy or JAX) committed to this device; other
        leaves (static options, dtypes, None, tracers) unchanged."""

        def one(a):
            if isinstance(a, jax.core.Tracer):
                return a
            if isinstance(a, (np.ndarray, jax.Array)):
                return jax.device_put(a, self.device)
            return a

        return jax.tree.map(one, tree)

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args, implementation=..., **kwargs)`` on this device, arrays put there."""
        with self.on_device():
            return fn(*self.put(args), implementation=self.implementation, **self.put(kwargs))

    def jit(self, fn: Callable, **jit_kwargs) -> Callable:
        """``jax.jit(fn)`` run on this device (its array arguments are put there first). ``fn``
        passes ``implementation=`` itself (for example through this object's methods)."""
        jitted = jax.jit(fn, **jit_kwargs)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self.on_device():
                return jitted(*self.put(args), **self.put(kwargs))

        return run

    # The public functions with this implementation's implementation= filled in. They run
    # wherever their inputs and the default device say: inside the fixtures, on self.device.
    def route_topk(self, logits, topk, **kwargs):
        return jr.route_topk(logits, topk, implementation=self.implementation, **kwargs)

    def fused_topk_with_score_function(self, logits, topk, **kwargs):
        return jr.fused_topk_with_score_function(logits, topk,
                                                 implementation=self.implementation, **kwargs)

    def route_topk_qb(self, logits, topk, *args, **kwargs):
        return jr.route_topk_qb(logits, topk, *args, implementation=self.implementation,
                                **kwargs)

    def fused_topk_with_score_function_qb(self, logits, topk, *args, **kwargs):
        return jr.fused_topk_with_score_function_qb(logits, topk, *args,
                                                    implementation=self.implementation, **kwargs)

    def fused_compute_score_for_moe_aux_loss(self, logits, topk, score_function,
                                             routing_map_format="bytemap"):
        return jr.fused_compute_score_for_moe_aux_loss(
            logits, topk, score_function, routing_map_format, implementation=self.implementation)


def _cpu_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return None


def _cuda_device():
    try:
        devices = jax.devices("cuda")
    except RuntimeError:  # no CUDA backend (CPU-only jaxlib, no GPU, or ROCm)
        return None
    return devices[0] if devices else None


@functools.cache
def present() -> dict[str, Impl]:
    """The implementations this machine runs, by name, in the order of NAMES."""
    found = {"xla": Impl("xla", jax.devices()[0], "xla")}
    kernels = _ffi.kernel_platforms()
    cpu = _cpu_device()
    if "cpu" in kernels and cpu is not None:
        found["cpu"] = Impl("cpu", cpu, "ffi")
    cuda = _cuda_device()
    if "cuda" in kernels and cuda is not None:
        found["cuda"] = Impl("cuda", cuda, "ffi")
    return found


def get(name: str) -> Impl | None:
    return present().get(name)


def missing_reason(name: str) -> str:
    """Why implementation ``name`` is not present here (empty when it is)."""
    if name in present():
        return ""
    kernels = sorted(_ffi.kernel_platforms())
    if name == "cuda":
        why = []
        if "cuda" not in kernels:
            why.append(f"jax_router was built without its CUDA kernels (kernel platforms: "
                       f"{kernels}; rebuild with nvcc on PATH, e.g. `make CUDA=ON install`)")
        if _cuda_device() is None:
            platforms = sorted({d.platform for d in jax.devices()})
            why.append(f"JAX sees no CUDA GPU (its platforms: {platforms}; install the CUDA "
                       f"plugin of the pinned jax, e.g. jax[cuda12])")
        return "; ".join(why)
    if name == "cpu":
        if "cpu" not in kernels:
            return "jax_router was built without its CPU kernels (run `make install`)"
        return "JAX has no CPU device (check JAX_PLATFORMS)"
    return f"unknown implementation {name!r}"


def require_gpu(option: bool = False) -> bool:
    """Whether this run must have the CUDA implementation (the --require-gpu option, or
    JAX_ROUTER_REQUIRE_GPU set to 1 / true / yes / on)."""
    value = os.environ.get(REQUIRE_GPU_ENV, "").strip().lower()
    if value not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
        raise ValueError(f"{REQUIRE_GPU_ENV}={value!r}: use 1 (require a GPU) or 0")
    return option or value in ("1", "true", "yes", "on")
