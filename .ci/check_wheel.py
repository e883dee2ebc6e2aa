"""Runs the README's quickstart with an installed jax_router and checks which path it took.

Usage (from outside the source tree, with the Python of the virtualenv under test):
    python check_wheel.py README.md kernels    # the FFI kernels must be registered and used
    python check_wheel.py README.md fallback   # a build this jaxlib cannot accept: JAX must
                                               # still work, and the router fall back, warning

The quickstart is taken from the README itself, so the documented code is what runs.
"""

import pathlib
import re
import sys
import warnings

readme, mode = sys.argv[1], sys.argv[2]
section = pathlib.Path(readme).read_text().split("## Quickstart", 1)[1]
quickstart = re.search(r"```python\n(.*?)```", section, re.S).group(1)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import jax
    import jax.numpy as jnp
    import jaxlib.version

    import jax_router as jr
    from jax_router import _ffi

    exec(compile(quickstart, "README quickstart", "exec"), {})
    logits = jax.random.normal(jax.random.key(1), (512, 64), jnp.float32)
    got = jr.route_topk(logits, 6, score_function="sigmoid", num_groups=8, group_topk=2)
    want = jr.route_topk(logits, 6, score_function="sigmoid", num_groups=8, group_topk=2,
                         implementation="xla")
assert "site-packages" in jr.__file__, f"not the installed package: {jr.__file__}"
assert bool((got[1] == want[1]).all()), "indices differ from the pure-JAX reference"
assert bool(jnp.allclose(got[0], want[0], rtol=1e-5)), "weights differ from the reference"
missing = [str(w.message) for w in caught if issubclass(w.category, jr.KernelsMissingWarning)]

compiled = tuple(_ffi._cpu.ffi_api_version()) if _ffi._cpu is not None else None
print(f"jaxlib {jaxlib.version.__version__} (FFI API {_ffi.runtime_ffi_api()}), "
      f"jax_router from {jr.__file__}, kernels: {sorted(_ffi.kernel_platforms())}")
if mode == "kernels":
    assert "cpu" in _ffi.kernel_platforms(), _ffi._MISSING
    assert not missing, missing
    print(f"OK: quickstart ran on the CPU kernels (compiled for FFI API {compiled})")
elif mode == "fallback":
    assert "cpu" not in _ffi.kernel_platforms()
    assert len(missing) == 1 and "was not registered" in missing[0], missing
    print(f"OK: JAX works and the router fell back to pure JAX, warning: {missing[0]}")
else:
    sys.exit(f"unknown mode {mode!r}")
