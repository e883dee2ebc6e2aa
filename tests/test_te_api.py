"""TransformerEngine's current JAX router API (docs/migration.md): the aux-loss scores through
``fused_topk_with_score_function(..., compute_aux_scores=True)`` and the four-argument
``fused_moe_aux_loss(probs, tokens_per_expert, topk, coeff)``, next to the older forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_router as jr
from jax_router import reference

from .util import random_bias, random_logits

T, E, K = 48, 32, 8


# ---- compute_aux_scores=True ---------------------------------------------------------------


@pytest.mark.parametrize("impl", [None, "xla"])
@pytest.mark.parametrize("fn", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("fmt", ["bytemap", "bitmap_u8"])
def test_compute_aux_scores_is_the_aux_score_function(impl, fn, fmt):
    """TE returns (scores, routing_map); fused_compute_score_for_moe_aux_loss the other way."""
    logits = random_logits(1, (T, E), jnp.bfloat16)
    scores, routing_map = jr.fused_topk_with_score_function(
        logits, K, score_function=fn, routing_map_format=fmt, compute_aux_scores=True,
        implementation=impl)
    want_map, want_scores = reference.fused_compute_score_for_moe_aux_loss(logits, K, fn, fmt)
    assert scores.dtype == jnp.float32 and routing_map.dtype == want_map.dtype
    np.testing.assert_array_equal(np.asarray(routing_map), np.asarray(want_map))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), rtol=2e-6, atol=1e-7)

    w = jnp.cos(jnp.arange(E, dtype=jnp.float32))
    grad = jax.grad(lambda x: jnp.sum(jr.fused_topk_with_score_function(
        x, K, score_function=fn, compute_aux_scores=True, implementation=impl)[0] * w))(logits)
    want_grad = jax.grad(lambda x: jnp.sum(
        reference.fused_compute_score_for_moe_aux_loss(x, K, fn)[1] * w))(logits)
    assert grad.dtype == logits.dtype
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32),
                               rtol=2e-2, atol=1e-6)


def test_compute_aux_scores_ignores_routing_options_like_te():
    """A TE call passes the router's whole configuration; the aux scores use none of it."""
    logits = random_logits(2, (T, E))
    bias = random_bias(2, E)
    scores, routing_map = jax.jit(lambda x, b: jr.fused_topk_with_score_function(
        x, K, False, 8, 4, 2.5, "sigmoid", b, compute_aux_scores=True))(logits, bias)
    want_map, want_scores = reference.fused_compute_score_for_moe_aux_loss(logits, K, "sigmoid")
    np.testing.assert_array_equal(np.asarray(routing_map), np.asarray(want_map))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), rtol=2e-6)


def test_compute_aux_scores_false_is_routing():
    logits = random_logits(3, (T, E))
    got = jr.fused_topk_with_score_function(logits, K, compute_aux_scores=False)
    want = jr.fused_topk_with_score_function(logits, K)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_compute_aux_scores_with_dense_indices_is_an_error():
    logits = random_logits(4, (T, E))
    with pytest.raises(ValueError, match="compute_aux_scores=True"):
        jr.fused_topk_with_score_function(logits, K, compute_aux_scores=True,
                                          topk_indices_dtype=jnp.int32)


def test_te_positional_compute_aux_scores_points_to_the_keyword():
    logits = random_logits(5, (T, E))
    with pytest.raises(ValueError, match="compute_aux_scores="):
        jr.fused_topk_with_score_function(logits, K, False, -1, -1, 1.0, "softmax", None, True)


# ---- fused_moe_aux_loss(probs, tokens_per_expert, topk, coeff) -----------------------------


def _probs_and_counts(seed, shape=(T, E)):
    probs = jax.nn.softmax(random_logits(seed, shape), axis=-1)
    tpe = jax.random.randint(jax.random.key(seed), (shape[-1],), 1, 50, jnp.int32)
    return probs, tpe


def test_four_argument_form_takes_t_and_e_from_probs():
    probs, tpe = _probs_and_counts(6)
    want = reference.fused_moe_aux_loss(probs, tpe, T, E, K, 1e-2)
    for loss in (jr.fused_moe_aux_loss(probs, tpe, K, 1e-2),
                 jr.fused_moe_aux_loss(probs, tpe, topk=K, coeff=1e-2),
                 jr.fused_moe_aux_loss(probs, tpe, K, coeff=jnp.float32(1e-2)),
                 jax.jit(lambda p, t: jr.fused_moe_aux_loss(p, t, K, 1e-2))(probs, tpe),
                 jr.fused_moe_aux_loss(probs, tpe, T, E, K, 1e-2)):
        assert loss.shape == () and loss.dtype == jnp.float32
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    g = jax.grad(lambda p: jr.fused_moe_aux_loss(p, tpe, K, 1e-2))(probs)
    want_g = jax.grad(lambda p: reference.fused_moe_aux_loss(p, tpe, T, E, K, 1e-2))(probs)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want_g), rtol=1e-6)


def test_four_argument_form_with_several_token_dims():
    probs, tpe = _probs_and_counts(7, (4, 12, E))
    want = reference.fused_moe_aux_loss(probs, tpe, 48, E, K, 0.1)
    np.testing.assert_allclose(float(jr.fused_moe_aux_loss(probs, tpe, K, 0.1)), float(want),
                               rtol=1e-6)


def test_four_argument_form_in_shard_map_counts_every_device_rows():
    devs = jax.devices()
    if len(devs) < 2 or 8 % len(devs):
        pytest.skip("needs 2, 4 or 8 devices (tests/conftest.py sets 8 host devices)")
    mesh = Mesh(np.array(devs), ("x",))
    probs, tpe = _probs_and_counts(8, (64, E))
    sharded = jax.jit(jax.shard_map(
        lambda p, t: jr.fused_moe_aux_loss(p, t, K, 0.1, axis_name="x"), mesh=mesh,
        in_specs=(P("x"), P()), out_specs=P()))
    want = reference.fused_moe_aux_loss(probs, tpe, 64, E, K, 0.1)
    np.testing.assert_allclose(float(sharded(probs, tpe)), float(want), rtol=1e-6)


@pytest.mark.parametrize("args,kwargs", [
    ((T, E, K), {}),                  # coeff missing
    ((), dict(topk=K)),               # coeff missing
    ((T, E), dict(coeff=0.1)),        # topk missing
    ((), {}),
], ids=["no-coeff", "topk-only", "no-topk", "nothing"])
def test_incomplete_aux_loss_calls_name_both_forms(args, kwargs):
    probs, tpe = _probs_and_counts(9)
    with pytest.raises(TypeError, match=r"\(probs, tokens_per_expert, topk, coeff\)"):
        jr.fused_moe_aux_loss(probs, tpe, *args, **kwargs)
