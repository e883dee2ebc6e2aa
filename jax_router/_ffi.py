"""Registers the compiled FFI handlers with XLA, once, at import.

Both extension modules export the same target names, so one ``ffi_call`` runs on whichever
platform the computation lands on.
"""

from __future__ import annotations

import jax

FWD_TARGET = "jax_router_fwd"
BWD_TARGET = "jax_router_bwd"
AUX_SCORES_FWD_TARGET = "jax_router_aux_scores_fwd"
AUX_SCORES_BWD_TARGET = "jax_router_aux_scores_bwd"

try:
    from . import _cpu
except ImportError:  # source checkout without a build: only the pure-JAX path works
    _cpu = None
try:
    from . import _cuda
except ImportError:  # built without nvcc
    _cuda = None

# Target names registered per platform ("cpu", "cuda"): not every target has every platform's
# handler (a CUDA build may lack a target the CPU module has), so callers ask per target.
_REGISTERED: dict[str, frozenset[str]] = {}
for _module, _platform in ((_cpu, "cpu"), (_cuda, "CUDA")):
    if _module is not None:
        _names = _module.registrations()
        for _name, _capsule in _names.items():
            jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)
        _REGISTERED[_platform.lower()] = frozenset(_names)


def kernel_platforms() -> frozenset[str]:
    """Platforms ("cpu", "cuda") with compiled handlers in this installation."""
    return frozenset(p for m, p in ((_cpu, "cpu"), (_cuda, "cuda")) if m is not None)


def target_platforms(target: str) -> frozenset[str]:
    """Platforms ("cpu", "cuda") with a compiled handler for the FFI target ``target``."""
    return frozenset(p for p, names in _REGISTERED.items() if target in names)


def default_backend_has_target(target: str) -> bool:
    """Whether the default backend has a compiled handler for ``target``."""
    return _default_platform() in target_platforms(target)


def _default_platform() -> str:
    backend = jax.default_backend()
    if backend == "gpu":
        try:
            version = jax.devices()[0].client.platform_version.lower()
        except Exception:  # noqa: BLE001 - unknown clients are simply not CUDA
            version = ""
        backend = "cuda" if "cuda" in version else backend
    return backend


def default_backend_has_kernels() -> bool:
    return _default_platform() in kernel_platforms()


def use_kernels(implementation: str | None, targets: tuple[str, ...], kernels: str) -> bool:
    """Resolves ``implementation`` (None | "ffi" | "xla") for an op built from ``targets``.

    None picks the kernels where the default backend has every target, else pure JAX; "ffi"
    insists on kernels (``kernels`` names them in the error when the build lacks them).
    """
    if implementation is None:
        return all(default_backend_has_target(t) for t in targets)
    if implementation == "ffi":
        if not all(target_platforms(t) for t in targets):
            raise ValueError(f"implementation='ffi' but jax_router was built without {kernels}")
        return True
    if implementation == "xla":
        return False
    raise ValueError(f"implementation must be None, 'ffi' or 'xla', got {implementation!r}")
