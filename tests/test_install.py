"""Installation contract: handlers are registered only with a jaxlib that accepts their FFI API
(else a warning and the pure-JAX path, JAX itself untouched), and a missing build is reported on
the first call instead of falling back silently.

The same contract is checked with real jaxlib releases by .ci/run (the wheel, built once,
installed next to the oldest supported jaxlib and next to the pinned one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import jax_router
from jax_router import _ffi


def _run(script: str, cwd=None) -> subprocess.CompletedProcess:
    # The child runs on the CPU backend whatever this machine has: these checks are about the
    # CPU handlers' registration and warning (a GPU would change which kernels are missing).
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_api_mismatch_rule():
    assert _ffi.api_mismatch((0, 1), (0, 1)) is None
    assert _ffi.api_mismatch((0, 1), (0, 4)) is None
    newer = _ffi.api_mismatch((0, 3), (0, 1))
    assert "XLA FFI API 0.3" in newer and "the 0.1 of the running jaxlib" in newer
    assert _ffi.api_mismatch((1, 0), (0, 4)) is not None
    assert _ffi.api_mismatch((0, 4), (1, 0)) is not None


def test_runtime_api_header_agrees_with_table():
    """The running jaxlib's c_api.h and the version table give the same FFI API."""
    version = _ffi.jaxlib_version()
    from_table = next(api for first, api in _ffi._FFI_API_BY_JAXLIB if version >= first)
    assert _ffi.runtime_ffi_api() == from_table


def test_registered_modules_are_accepted_by_this_jaxlib():
    runtime = _ffi.runtime_ffi_api()
    for module in (_ffi._cpu, _ffi._cuda):
        if module is not None:
            version = tuple(module.ffi_api_version())
            assert version[0] == runtime[0] and version[1] <= runtime[1]


def test_floor_is_the_metadata_floor():
    """pyproject.toml requires the jaxlib whose headers the build uses."""
    pyproject = os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")
    if not os.path.exists(pyproject):
        pytest.skip("not run from the source tree")
    floor = ".".join(map(str, _ffi.JAXLIB_FLOOR))
    text = open(pyproject).read()
    assert f'"jaxlib>={floor}"' in text and f'"jax>={floor}"' in text
    cmake = open(os.path.join(os.path.dirname(pyproject), "cmake", "xla_headers.cmake")).read()
    assert f'set(JAX_ROUTER_JAXLIB_FLOOR "{floor}")' in cmake


@pytest.mark.skipif(_ffi._cpu is None, reason="needs the compiled CPU module")
def test_module_newer_than_jaxlib_is_not_registered():
    """A module reporting an FFI API newer than the running jaxlib's is left unregistered: JAX
    works, the router warns at import and runs pure JAX, "ffi" says why."""
    _run(f"""
        import importlib.util, sys, types, warnings
        # jax first, as `import jax_router` does: with the extension loaded before jax, the
        # H200 machine's ml_dtypes crashed computing float4 finfo on import (seen 2026-11-30)
        import jax, jax.numpy as jnp
        spec = importlib.util.spec_from_file_location("jax_router._cpu", {_ffi._cpu.__file__!r})
        real = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(real)
        newer = types.ModuleType("jax_router._cpu")
        newer.registrations = real.registrations
        newer.ffi_api_version = lambda: (0, 99)
        sys.modules["jax_router._cpu"] = newer
        sys.modules["jax_router._cuda"] = None  # a CPU-only install, also on a GPU machine

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import jax, jax.numpy as jnp
            import jax_router as jr
            assert float(jnp.arange(4.0).sum()) == 6.0  # the CPU backend starts
            w, i = jr.route_topk(jnp.ones((3, 8)), 2)
            jr.route_topk(jnp.ones((3, 8)), 2)
        msgs = [str(c.message) for c in caught if c.category is jr.KernelsMissingWarning]
        assert len(msgs) == 1, msgs
        assert "jax_router._cpu was not registered" in msgs[0] and "0.99" in msgs[0], msgs
        assert "cpu" not in jr._ffi.kernel_platforms()
        try:
            jr.route_topk(jnp.ones((3, 8)), 2, implementation="ffi")
        except ValueError as e:
            assert "0.99" in str(e), e
        else:
            raise AssertionError("implementation='ffi' did not raise")
    """)


def test_unbuilt_source_tree_warns_once_on_first_call(tmp_path):
    """Python started in a source tree imports ./jax_router, which has no compiled modules:
    the first default call warns (why, from where, how to fix); "ffi" raises the same."""
    package = os.path.dirname(jax_router.__file__)
    shutil.copytree(package, tmp_path / "jax_router",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    done = _run("""
        import sys, warnings
        # An editable install's import hook would find the built package first.
        sys.meta_path[:] = [f for f in sys.meta_path
                            if not type(f).__module__.startswith("_editable")]
        sys.path.insert(0, ".")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import jax.numpy as jnp
            import jax_router as jr
            x = jnp.ones((3, 8))
            assert not caught, [str(c.message) for c in caught]  # nothing at import
            jr.route_topk(x, 2, implementation="xla")            # asked for: no warning
            assert not caught, [str(c.message) for c in caught]
            jr.route_topk(x, 2)
            jr.fused_topk_with_score_function(x, 2)
            jr.fused_compute_score_for_moe_aux_loss(x, 2, "softmax")
        msgs = [str(c.message) for c in caught if c.category is jr.KernelsMissingWarning]
        assert len(msgs) == 1, msgs
        print(msgs[0])
        try:
            jr.route_topk(x, 2, implementation="ffi")
        except ValueError as e:
            print("ffi:", e)
        else:
            raise AssertionError("implementation='ffi' did not raise")
    """, cwd=tmp_path)
    warning, error = done.stdout.strip().split("\nffi: ")
    here = str(tmp_path / "jax_router")
    for text in (warning, error):
        assert f"jax_router was imported from {here}, which has no compiled _cpu module" in text
        assert "make install" in text and "outside the source tree" in text
    assert "pure-JAX implementation" in warning
