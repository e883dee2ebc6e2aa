"""The CPU forward's two row routines (AVX-512 and scalar) give the same outputs, bit for bit.

Each routine runs in its own process (JAX_ROUTER_CPU_NO_AVX512 selects the scalar one), on the
shapes the AVX-512 routine takes and on inputs built to hit ties, NaN, +-inf and +-0.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

CHILD = r"""
import sys
import numpy as np
import jax
import jax.numpy as jnp
import jax_router as jr

jax.config.update("jax_platforms", "cpu")
CASES = [
    # E, topk, options
    (256, 8, dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5)),
    (256, 8, dict(score_function="sigmoid")),
    (256, 16, dict(score_function="sigmoid", num_groups=16, group_topk=8)),
    (512, 8, dict(score_function="sigmoid", num_groups=8, group_topk=4)),
    (384, 8, dict(score_function="sigmoid", scaling_factor=2.827)),
    (128, 8, dict(score_function="softmax")),
    (64, 4, dict(score_function="sqrtsoftplus", num_groups=4, group_topk=2)),
    (32, 4, dict(score_function="softmax", use_pre_softmax=True)),
    (16, 2, dict(score_function="sigmoid", num_groups=1, group_topk=1)),
]
rng = np.random.default_rng(0)
out = {}
for c, (E, k, kw) in enumerate(CASES):
    x = 2.0 * rng.standard_normal((6, 64, E)).astype(np.float32)
    x[1] = rng.integers(-3, 4, (64, E))                            # exact ties
    x[2] = 0.5                                                     # constant rows
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    pick = rng.integers(0, 10, (64, E))
    x[3] = np.where(pick < 5, special[np.minimum(pick, 4)], x[3])  # NaN, +-inf, +-0
    x[4] = np.where(rng.random((64, E)) < 0.5, 0.0, -0.0)
    x[5] = 1e-3 * x[5]
    bias = 0.1 * rng.standard_normal(E).astype(np.float32)
    bias[: E // 4] = 0.25                                          # tied bias values
    if kw["score_function"] == "softmax":
        bias = None
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        logits = jnp.asarray(x, dtype)
        b = None if bias is None else jnp.asarray(bias)
        w, i = jr.route_topk(logits, k, expert_bias=b, implementation="ffi", **kw)
        p, m = jr.fused_topk_with_score_function(logits, k, expert_bias=b, implementation="ffi",
                                                 **kw)
        name = f"{c}_{jnp.dtype(dtype).name}"
        out[name + "_w"], out[name + "_i"] = np.asarray(w), np.asarray(i)
        out[name + "_p"] = np.asarray(p.astype(jnp.float32))
        out[name + "_m"] = np.asarray(m)
np.savez(sys.argv[1], **out)
"""


def _run(path, scalar):
    env = dict(os.environ)
    env.pop("JAX_ROUTER_CPU_NO_AVX512", None)
    if scalar:
        env["JAX_ROUTER_CPU_NO_AVX512"] = "1"
    subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, timeout=300, env=env)
    return np.load(path)


def _same(a, b):
    """Equal bits, except that any NaN equals any NaN (payloads are not part of the contract)."""
    if a.dtype.kind != "f":
        return np.array_equal(a, b)
    nan = np.isnan(a)
    bits = a.view(np.uint32 if a.itemsize == 4 else np.uint16)
    other = b.view(bits.dtype)
    return np.array_equal(nan, np.isnan(b)) and np.array_equal(bits[~nan], other[~nan])


def test_avx512_and_scalar_routines_agree(tmp_path):
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512bw" not in flags:
        pytest.skip("no AVX-512 on this CPU: only the scalar routine runs")
    vec = _run(tmp_path / "vec.npz", scalar=False)
    ref = _run(tmp_path / "scalar.npz", scalar=True)
    assert sorted(vec.files) == sorted(ref.files)
    bad = [name for name in vec.files if not _same(vec[name], ref[name])]
    assert not bad, f"outputs differ between the AVX-512 and scalar routines: {bad}"
