"""Registers the compiled FFI handlers with XLA, once, at import.

Both extension modules export the same target names, so one ``ffi_call`` runs on whichever
platform the computation lands on.
"""

from __future__ import annotations

import jax

FWD_TARGET = "jax_router_fwd"
BWD_TARGET = "jax_router_bwd"

try:
    from . import _cpu
except ImportError:  # source checkout without a build: only the pure-JAX path works
    _cpu = None
try:
    from . import _cuda
except ImportError:  # built without nvcc
    _cuda = None

for _module, _platform in ((_cpu, "cpu"), (_cuda, "CUDA")):
    if _module is not None:
        for _name, _capsule in _module.registrations().items():
            jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)


def kernel_platforms() -> frozenset[str]:
    """Platforms ("cpu", "cuda") with compiled handlers in this installation."""
    return frozenset(p for m, p in ((_cpu, "cpu"), (_cuda, "cuda")) if m is not None)


def default_backend_has_kernels() -> bool:
    backend = jax.default_backend()
    if backend == "gpu":
        try:
            version = jax.devices()[0].client.platform_version.lower()
        except Exception:  # noqa: BLE001 - unknown clients are simply not CUDA
            version = ""
        backend = "cuda" if "cuda" in version else backend
    return backend in kernel_platforms()
