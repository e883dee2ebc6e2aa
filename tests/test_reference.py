"""The reference itself, against brute force: its fast float top-k reproduces the key order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr
from jax_router.reference import order_key, spec_top_k


def _brute_force_order(row, kept):
    """Sort ids by (kept, not NaN, value) descending, then id ascending; +0 above -0."""
    def key(e):
        v = row[e]
        if not kept[e]:
            return (0, 0, 0.0, 0, -e)
        if np.isnan(v):
            return (1, 0, 0.0, 0, -e)
        return (1, 1, float(v), int(not np.signbit(v)) if v == 0 else 0, -e)
    return sorted(range(len(row)), key=key, reverse=True)


@pytest.mark.parametrize("seed", range(6))
def test_spec_top_k_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        E = int(rng.integers(1, 40))
        k = int(rng.integers(1, E + 1))
        x = (np.round(rng.normal(size=(4, E)) * 2) / 2).astype(np.float32)
        u = rng.random((4, E))
        x[u < 0.2] = np.nan
        x[(u >= 0.2) & (u < 0.3)] = -np.inf
        x[(u >= 0.3) & (u < 0.35)] = np.inf
        x[(u >= 0.35) & (u < 0.45)] = -0.0
        kept = rng.random((4, E)) < 0.7
        kept[:, :k] = True
        for kp in (None, kept):
            got = np.asarray(spec_top_k(jnp.asarray(x), k, None if kp is None else jnp.asarray(kp)))
            for r in range(4):
                want = _brute_force_order(x[r], np.ones(E, bool) if kp is None else kp[r])[:k]
                np.testing.assert_array_equal(got[r], want)
            keys = order_key(jnp.asarray(x))
            if kp is not None:
                keys = jnp.where(kp, keys, np.int32(np.iinfo(np.int32).min))
            np.testing.assert_array_equal(got, jax.lax.top_k(keys, k)[1])


def test_reference_weights_by_hand():
    x = jnp.array([[0.0, 2.0, 1.0, -1.0]])
    w, idx = jr.reference.route_topk(x, 2, score_function="sigmoid", scaling_factor=3.0)
    s = 1 / (1 + np.exp(-np.array([2.0, 1.0])))
    np.testing.assert_array_equal(idx, [[1, 2]])
    np.testing.assert_allclose(w, [3.0 * s / s.sum()], rtol=1e-6)
    w, idx = jr.reference.route_topk(x, 2)
    e = np.exp(np.array([2.0, 1.0]))
    np.testing.assert_allclose(w, [e / e.sum()], rtol=1e-6)
    w, idx = jr.reference.route_topk(x, 2, use_pre_softmax=True)
    e = np.exp(np.array([0.0, 2.0, 1.0, -1.0]))
    np.testing.assert_allclose(w, [e[[1, 2]] / e.sum()], rtol=1e-6)
    # Unbiased weights: the bias moves the choice, not the values.
    bias = jnp.array([5.0, 0.0, 0.0, 0.0])
    w, idx = jr.reference.route_topk(x, 1, score_function="sigmoid", expert_bias=bias)
    np.testing.assert_array_equal(idx, [[0]])
    np.testing.assert_allclose(w, [[0.5]])


def test_sqrtsoftplus_large_inputs_have_finite_gradients():
    x = jnp.array([[30.0, 25.0, -3.0, 100.0]])
    g = jax.grad(lambda x: jr.reference.route_topk(x, 2, score_function="sqrtsoftplus")[0].sum())(x)
    assert np.isfinite(np.asarray(g)).all()
