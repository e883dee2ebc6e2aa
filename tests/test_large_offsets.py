"""docs/semantics.md#shapes: offsets are 64-bit, so T * E may exceed 2^31. One run on each CUDA kernel path with
T * E > 2^31 (the fast lane-group path at E = 256, the general block path at E = 8192): rows
past element 2^31 must equal the same rows routed on their own and the reference.

On a GPU machine only (the gpu marker), for both kernel implementations there (CUDA, and the CPU
kernels on its host): the inputs alone are 4 GiB and the CPU machine that runs CI has 2 cores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr

from .util import assert_indices_match, options_for, random_bias, selection_scores

pytestmark = pytest.mark.gpu

# (E, topk, kwargs, T) with T * E > 2^31 + some rows
CASES = [
    (256, 8, dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5),
     (1 << 31) // 256 + 4099),
    (8192, 8, dict(score_function="softmax"), (1 << 31) // 8192 + 517),
]


@jax.jit(static_argnums=(0, 1))
def _pattern_logits(T, E):
    """Logits in [-2, 2) from a hash of (row, expert): fused by XLA, no 4-byte [T, E] copies
    (a full-size random draw would need several)."""
    rows = jnp.arange(T, dtype=jnp.uint32)[:, None]
    cols = jnp.arange(E, dtype=jnp.uint32)[None, :]
    h = (rows * jnp.uint32(2654435761) + cols * jnp.uint32(40503)) ^ (rows >> 3)
    h = h * jnp.uint32(2246822519)
    return ((h >> 8).astype(jnp.float32) * (4.0 / (1 << 24)) - 2.0).astype(jnp.bfloat16)


@pytest.mark.parametrize("E,topk,kw,T", CASES, ids=["fast_E256", "general_E8192"])
def test_more_than_2_pow_31_elements(kernel_impl, E, topk, kw, T):
    assert T * E > 2**31
    impl = kernel_impl
    kw = dict(kw)
    if kw["score_function"] == "sigmoid":
        kw["expert_bias"] = random_bias(40, E)
    logits = _pattern_logits(T, E)
    w, idx = jax.jit(lambda x: impl.route_topk(x, topk, **kw))(logits)
    probs, dense = jax.jit(lambda x: impl.fused_topk_with_score_function(
        x, topk, topk_indices_dtype=jnp.int32, **kw))(logits)
    cot = jnp.cos(jnp.arange(topk, dtype=jnp.float32))
    g = jax.jit(jax.grad(lambda x: jnp.sum(
        impl.route_topk(x, topk, **kw)[0] * cot)))(logits)

    past = (1 << 31) // E  # the first row whose elements lie past 2^31
    for sl in (slice(0, 64), slice(past - 32, past + 32), slice(T - 64, T)):
        x = logits[sl]
        w1, i1 = impl.route_topk(x, topk, **kw)
        np.testing.assert_array_equal(np.asarray(idx[sl]), np.asarray(i1))
        np.testing.assert_array_equal(np.asarray(w[sl]), np.asarray(w1))
        np.testing.assert_array_equal(np.asarray(dense[sl]), np.asarray(i1))
        p1, _ = impl.fused_topk_with_score_function(x, topk, topk_indices_dtype=jnp.int32,
                                                    **kw)
        np.testing.assert_array_equal(np.asarray(probs[sl], np.float32),
                                      np.asarray(p1, np.float32))
        g1 = jax.grad(lambda x: jnp.sum(
            impl.route_topk(x, topk, **kw)[0] * cot))(x)
        np.testing.assert_array_equal(np.asarray(g[sl], np.float32), np.asarray(g1, np.float32))
        rw, ri = jr.reference.route_topk(x, topk, **kw)
        z = selection_scores(x, options_for(x, topk, **kw), kw.get("expert_bias"))
        assert_indices_match(i1, ri, z)
        np.testing.assert_allclose(np.asarray(w1), np.asarray(rw), rtol=1e-5, atol=1e-7)
    # the gradient is zero off the selected experts, also past 2^31
    last = np.asarray(g[T - 1], np.float32)
    assert np.count_nonzero(last) <= topk and np.count_nonzero(last) > 0
