"""docs/semantics.md#dispatch: the CPU and CUDA dispatch kernels give bit-identical outputs: the
plan, permute, unpermute and every gradient, NaN payloads included.

Inputs mix random values with hard ones (subnormals, +-0, +-inf, NaN, values whose products
overflow or underflow), every row dtype, odd hidden sizes (element-by-element CUDA path) and
multiples of 16 bytes (vector path), and expert counts past the CUDA plan kernels' shared-
memory tables. Runs only where there is a GPU (the gpu marker).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr

from .dispatch_util import random_ids
from .test_cross_platform import UINT, cpu_and_cuda, run_on_both  # noqa: F401 (a fixture)

pytestmark = pytest.mark.gpu
F32 = np.float32


def hard_values(rng, shape, dtype):
    v = rng.standard_normal(shape).astype(F32) * rng.choice(
        np.array([1e-3, 1.0, 30.0], F32), shape)
    u = rng.random(shape)
    v[u < 0.02] = np.nan
    v[(u >= 0.02) & (u < 0.04)] = np.inf
    v[(u >= 0.04) & (u < 0.06)] = -np.inf
    v[(u >= 0.06) & (u < 0.10)] = -0.0
    v[(u >= 0.10) & (u < 0.15)] *= F32(1e-39)  # subnormal in float32 and bfloat16
    v[(u >= 0.15) & (u < 0.18)] = F32(3e38)  # products overflow
    with np.errstate(over="ignore"):
        return v.astype(dtype)


def dispatch_program(E, capacity):
    def make(impl):
        def program(idx, x, w, y, cot):
            plan = jr.dispatch_plan(idx, E, capacity=capacity, implementation="ffi")
            rows, vjp_p = jax.vjp(lambda x: jr.permute(x, plan, implementation="ffi"), x)
            out, vjp_u = jax.vjp(lambda y, w: jr.unpermute(y, plan, w, implementation="ffi"),
                                 y, w)
            (dx,) = vjp_p(y)
            dy, dw = vjp_u(cot)
            return {"tokens_per_expert": plan.tokens_per_expert, "positions": plan.positions,
                    "source": plan.source, "rows": rows, "out": out, "dx": dx, "drows": dy,
                    "dweights": dw}

        return program

    return make


# (T, k, E, H, capacity)
CASES = [
    (4096, 8, 256, 7168, None),
    (3000, 4, 37, 13, 90),
    (777, 6, 7000, 64, None),
    (500, 2, 13000, 40, 1),
    (1, 1, 3, 8, None),
]
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"T{c[0]}-k{c[1]}-E{c[2]}-H{c[3]}-C{c[4]}" for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dispatch_bits_equal(cpu_and_cuda, case, dtype):
    T, k, E, H, capacity = CASES[case]
    if H >= 4096 and dtype != jnp.bfloat16:
        pytest.skip("the large hidden size runs in bfloat16 only (time)")
    rng = np.random.default_rng(case)
    idx = random_ids(rng, (T, k), E, ("zipf", "invalid")[case % 2]).astype(np.int32)
    x = hard_values(rng, (T, H), dtype)
    w = hard_values(rng, (T, k), DTYPES[case % 3])
    R = T * k if capacity is None else E * capacity
    y = hard_values(rng, (R, H), dtype)
    cot = hard_values(rng, (T, H), dtype)
    cpu, cuda = run_on_both(cpu_and_cuda, dispatch_program(E, capacity), idx, x, w, y, cot)
    assert np.count_nonzero(np.nan_to_num(np.asarray(cpu["out"], F32))) > 0
    differ = []
    for name in cpu:
        a, b = np.asarray(cpu[name]), np.asarray(cuda[name])
        ua = np.ascontiguousarray(a).view(UINT[a.dtype.itemsize])
        ub = np.ascontiguousarray(b).view(UINT[b.dtype.itemsize])
        if a.shape != b.shape or not np.array_equal(ua, ub):
            bad = np.argwhere(ua != ub)[:4] if a.shape == b.shape else "shape"
            differ.append(f"{name}: first differences at {bad}")
    assert not differ, "CPU and CUDA dispatch kernels disagree:\n" + "\n".join(differ)
