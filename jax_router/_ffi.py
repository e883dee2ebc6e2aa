"""Registers the compiled FFI handlers with XLA, once, at import.

Both extension modules export the same target names, so one ``ffi_call`` runs on whichever
platform the computation lands on.

Registration must never break JAX: XLA rejects a handler compiled against a newer FFI API than
its own, and on CPU such a rejection stops the whole backend from starting (every JAX program
in the process fails, not only the router). So each module's FFI API version is compared with
the running jaxlib's first, and a module it cannot accept is not registered: the router then
runs its pure-JAX path and says why (``KernelsMissingWarning``).
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import warnings

import jax

FWD_TARGET = "jax_router_fwd"
QB_FWD_TARGET = "jax_router_qb_fwd"
BWD_TARGET = "jax_router_bwd"
AUX_SCORES_FWD_TARGET = "jax_router_aux_scores_fwd"
AUX_SCORES_BWD_TARGET = "jax_router_aux_scores_bwd"
DISPATCH_PLAN_TARGET = "jax_router_dispatch_plan"
PERMUTE_TARGET = "jax_router_permute"
UNPERMUTE_TARGET = "jax_router_unpermute"
UNPERMUTE_BWD_TARGET = "jax_router_unpermute_bwd"
DISPATCH_TARGETS = (DISPATCH_PLAN_TARGET, PERMUTE_TARGET, UNPERMUTE_TARGET, UNPERMUTE_BWD_TARGET)
# Every FFI target the extension modules register (ffi/module.cc JR_TARGETS), in its order.
TARGETS = (FWD_TARGET, QB_FWD_TARGET, BWD_TARGET, AUX_SCORES_FWD_TARGET,
           AUX_SCORES_BWD_TARGET) + DISPATCH_TARGETS

# The oldest supported jaxlib. The build compiles against its FFI headers (cmake/
# xla_headers.cmake) and pyproject.toml requires it at run time. (The handlers would compile
# against 0.6's headers too, the same FFI API 0.1, but the row-wise partitioning in sharding.py
# needs jax 0.8: the public mlir.ir_attribute and Shardy's need_replication_factors.)
JAXLIB_FLOOR = (0, 8, 0)

# XLA FFI API version (major, minor) of jaxlib releases, as read from the c_api.h each ships
# (0.6.0-0.8.0: 0.1, 0.8.1-0.9.0: 0.2, 0.9.1-0.10.2: 0.3; 0.11.1+: 0.4). Only used when the
# running jaxlib's headers are not installed; newest first.
_FFI_API_BY_JAXLIB = (
    ((0, 11, 1), (0, 4)),
    ((0, 9, 1), (0, 3)),
    ((0, 8, 1), (0, 2)),
    ((0, 0, 0), (0, 1)),
)

_BUILD_FIX = (
    "To build the kernels: `make install` in the source tree, or `pip install "
    "--no-build-isolation -e .` there (see the README). If jax_router is installed (a wheel, "
    "`pip install .`), run Python from outside the source tree, so that `import jax_router` "
    "finds the installed package rather than the source directory"
)


class KernelsMissingWarning(RuntimeWarning):
    """The current backend is CPU or CUDA but jax_router's kernels for it are not available;
    the router runs its pure-JAX implementation (same results, slower). The message says why."""


def jaxlib_version() -> tuple[int, ...]:
    """The running jaxlib's version as a tuple of ints, e.g. (0, 10, 2)."""
    import jaxlib.version

    return tuple(int(p) for p in re.findall(r"\d+", jaxlib.version.__version__)[:3])


def runtime_ffi_api() -> tuple[int, int]:
    """XLA FFI API version (major, minor) of the running jaxlib.

    Read from the ``c_api.h`` that jaxlib ships with its runtime (the same XLA revision), else
    looked up by jaxlib version.
    """
    try:
        with open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")) as f:
            text = f.read()
        major = re.search(r"#define\s+XLA_FFI_API_MAJOR\s+(\d+)", text)
        minor = re.search(r"#define\s+XLA_FFI_API_MINOR\s+(\d+)", text)
        if major and minor:
            return int(major.group(1)), int(minor.group(1))
    except (OSError, AttributeError):
        pass
    version = jaxlib_version()
    return next(api for first, api in _FFI_API_BY_JAXLIB if version >= first)


def _version_str(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def api_mismatch(compiled: tuple[int, int], runtime: tuple[int, int]) -> str | None:
    """Why a handler built on FFI API ``compiled`` cannot be registered with a jaxlib of FFI API
    ``runtime``, or None if it can (same major, minor not newer)."""
    if compiled[0] == runtime[0] and compiled[1] <= runtime[1]:
        return None
    return (f"it was compiled against XLA FFI API {_version_str(compiled)}, newer than the "
            f"{_version_str(runtime)} of the running jaxlib {_version_str(jaxlib_version())}, "
            "which would reject its handlers (and fail to start its backend). Rebuild jax_router "
            "(the default build uses the FFI headers of jaxlib "
            f"{_version_str(JAXLIB_FLOOR)}, which every supported jaxlib accepts), or upgrade "
            "jaxlib")


# Why a platform's kernels are unavailable ("cpu" / "cuda" -> reason), and whether that was
# already reported.
_MISSING: dict[str, str] = {}
_WARNED: set[str] = set()


def _load(name: str, platform: str):
    """Imports ``jax_router.<name>`` (a compiled module); None, with the reason recorded, if it
    cannot be imported or registered with this jaxlib."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    try:
        module = importlib.import_module(f".{name}", __package__)
    except ImportError as e:
        built = glob.glob(os.path.join(package_dir, f"{name}.*.so")) + glob.glob(
            os.path.join(package_dir, f"{name}.*.pyd"))
        if built:
            _MISSING[platform] = f"jax_router.{name} ({built[0]}) failed to import: {e}"
        elif name == "_cuda" and "cpu" not in _MISSING:
            _MISSING[platform] = (
                "this build of jax_router has no CUDA kernels (it was built without nvcc, with "
                "JAX_ROUTER_CUDA=OFF, or with AUTO on a machine with no GPU). Rebuild with nvcc "
                "on PATH and -Ccmake.define.JAX_ROUTER_CUDA=ON (make CUDA=ON install)")
        else:
            _MISSING[platform] = (
                f"jax_router was imported from {package_dir}, which has no compiled {name} "
                f"module ({e}). {_BUILD_FIX}")
        return None
    version = getattr(module, "ffi_api_version", None)
    if version is None:
        problem = "it was built by an older jax_router that does not report its FFI API version"
    else:
        problem = api_mismatch(tuple(version()), runtime_ffi_api())
    if problem is None and jaxlib_version() < JAXLIB_FLOOR:
        problem = (f"jaxlib {_version_str(jaxlib_version())} is older than "
                   f"{_version_str(JAXLIB_FLOOR)}, the oldest jax_router supports; upgrade jaxlib")
    if problem is not None:
        _MISSING[platform] = f"jax_router.{name} was not registered: {problem}"
        # Said at import: this concerns the installation whichever backend later runs.
        _WARNED.add(platform)
        warnings.warn(f"{_MISSING[platform]}. The router uses its pure-JAX implementation.",
                      KernelsMissingWarning, stacklevel=2)
        return None
    return module


_cpu = _load("_cpu", "cpu")
_cuda = _load("_cuda", "cuda")

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


def missing_reason(platform: str, targets: tuple[str, ...] = ()) -> str:
    """Why ``platform`` ("cpu" / "cuda" / another backend) lacks some of ``targets``."""
    if platform not in ("cpu", "cuda"):
        return (f"jax_router has kernels for CPU and CUDA only, not for {platform}; there it "
                "runs pure JAX (implementation=None or 'xla')")
    if platform in _MISSING:
        return _MISSING[platform]
    lacking = [t for t in targets if platform not in target_platforms(t)]
    return f"this build's {platform} module has no handler for {', '.join(lacking)}"


def _warn_fallback(targets: tuple[str, ...]) -> None:
    """Once per platform: the default backend is CPU or CUDA, yet the router falls back."""
    platform = _default_platform()
    if platform not in ("cpu", "cuda") or platform in _WARNED:
        return
    _WARNED.add(platform)
    warnings.warn(
        f"jax_router has no {platform} kernels, so it runs its pure-JAX implementation (same "
        f"results, slower): {missing_reason(platform, targets)}. Pass implementation='xla' to "
        "choose that path explicitly (no warning).", KernelsMissingWarning, stacklevel=5)


def use_kernels(implementation: str | None, targets: tuple[str, ...], kernels: str) -> bool:
    """Resolves ``implementation`` (None | "ffi" | "xla") for an op built from ``targets``.

    None picks the kernels where the default backend has every target, else pure JAX (warning
    once when that backend is CPU or CUDA, which should have had kernels); "ffi" insists on the
    default backend's kernels (``kernels`` names them in the error, with the reason).
    """
    if implementation is None:
        if all(default_backend_has_target(t) for t in targets):
            return True
        _warn_fallback(targets)
        return False
    if implementation == "ffi":
        platform = _default_platform()
        if not all(platform in target_platforms(t) for t in targets):
            raise ValueError(f"implementation='ffi', but the {kernels} are not available on "
                             f"the {platform} backend: {missing_reason(platform, targets)}")
        return True
    if implementation == "xla":
        return False
    raise ValueError(f"implementation must be None, 'ffi' or 'xla', got {implementation!r}")


def export_checks() -> list:
    """``disabled_checks`` for ``jax.export`` of a function that calls jax_router.

    ``jax.export`` refuses custom calls whose targets have no compatibility guarantee from JAX
    itself (``Cannot serialize code with custom calls whose targets have no compatibility
    guarantees``). These are exactly this package's FFI targets (``TARGETS``), nothing more::

        exported = jax.export.export(jax.jit(f), disabled_checks=jax_router.export_checks())(
            *args)

    The process that deserializes and calls it must ``import jax_router`` first (that registers
    the targets), with a jax_router whose targets take the same operands and attributes.
    """
    from jax import export

    return [export.DisabledSafetyCheck.custom_call(target) for target in TARGETS]
