"""Shared test helpers: random inputs and the index comparison oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jax_router as jr
from jax_router.options import make_options
from jax_router.reference import route_core

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# (score_function, use_pre_softmax, with_bias): every score configuration docs/semantics.md#forward allows.
SCORE_CONFIGS = [
    ("softmax", False, False),
    ("softmax", True, False),
    ("sigmoid", False, False),
    ("sigmoid", False, True),
    ("sqrtsoftplus", False, False),
    ("sqrtsoftplus", False, True),
]
SCORE_IDS = [f"{s}{'-pre' if p else ''}{'-bias' if b else ''}" for s, p, b in SCORE_CONFIGS]

# Relative tolerances for probs / weights by logits dtype: float32 ~1e-6; half types round
# their output to 8 / 11 bits.
RTOL = {jnp.dtype(jnp.float32): 2e-6, jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 2e-3}


def random_logits(seed: int, shape, dtype=jnp.float32, scale: float = 2.0) -> jax.Array:
    """Random normal logits (never zeros), drawn in float32 then cast."""
    x = scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    return x.astype(dtype)


def random_bias(seed: int, num_experts: int, dtype=jnp.float32) -> jax.Array:
    return (0.1 * jax.random.normal(jax.random.key(seed + 1000), (num_experts,))).astype(dtype)


def selection_scores(logits, opts, expert_bias) -> np.ndarray:
    """The reference's selection scores z (float32 numpy), to judge near-ties."""
    x = jnp.asarray(logits).astype(jnp.float32)
    fn = opts.score_function
    if fn == jr.ScoreFunction.SOFTMAX:
        z = jax.nn.softmax(x, axis=-1) if opts.use_pre_softmax else x
    else:
        z = jr.reference.activation(fn, x)
        if expert_bias is not None:
            z = z + jnp.asarray(expert_bias).astype(jnp.float32)
    return np.asarray(z)


def assert_indices_match(idx, ref_idx, z, *, rtol=1e-5, max_flip_fraction=1e-3):
    """Indices must equal the reference's exactly, slot by slot.

    A slot may differ only where the two experts' reference selection scores agree to ``rtol``
    (a near-tie that ulp-level differences between the kernels' and XLA's exp can flip); exact
    ties never may (both sides then compare equal keys and must pick the lower id). At most
    ``max_flip_fraction`` of the rows may contain such a flip.
    """
    idx = np.asarray(idx).astype(np.int64)
    ref_idx = np.asarray(ref_idx).astype(np.int64)
    assert idx.shape == ref_idx.shape, (idx.shape, ref_idx.shape)
    k = idx.shape[-1]
    E = z.shape[-1]
    idx2, ref2 = idx.reshape(-1, k), ref_idx.reshape(-1, k)
    assert ((idx2 >= 0) & (idx2 < E)).all(), "index out of range"
    for row in idx2:
        assert len(set(row.tolist())) == k, f"repeated index in row {row}"
    bad = np.nonzero((idx2 != ref2).any(axis=1))[0]
    if bad.size == 0:
        return
    z2 = np.asarray(z, np.float64).reshape(-1, E)
    for r in bad:
        a, b = z2[r, idx2[r]], z2[r, ref2[r]]
        close = np.isclose(a, b, rtol=rtol, atol=1e-7) & (a != b)
        same = idx2[r] == ref2[r]
        assert (same | close).all(), (
            f"row {r}: indices {idx2[r]} != reference {ref2[r]} (scores {a} vs {b})"
        )
    assert bad.size <= max(1, max_flip_fraction * idx2.shape[0]), f"{bad.size} rows flipped"


def compare_to_reference(out, ref, dtype, what=""):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    rtol = RTOL[jnp.dtype(dtype)]
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * 1e-3, err_msg=what)


def options_for(logits, topk, **kw):
    return make_options(logits, topk, kw.get("use_pre_softmax", False), kw.get("num_groups"),
                        kw.get("group_topk"), kw.get("scaling_factor"),
                        kw.get("score_function", "softmax"), kw.get("expert_bias"))


__all__ = ["SCORE_CONFIGS", "SCORE_IDS", "random_logits", "random_bias", "assert_indices_match", "selection_scores",
           "compare_to_reference", "options_for", "route_core", "FLOAT_DTYPES", "RTOL"]
