"""Calls in the style of TransformerEngine's router users (docs/migration.md).

Positional arguments in TE's order, TE-like enums for the score function, ``-1`` (and TE's old
``1``) for "no groups", ``scaling_factor=None``, TE's integer map formats, and the aux-loss
helpers with TE's positional arguments. Every result is checked against jax_router.reference
called by keyword with canonical strings, on random normal inputs, so a call that silently
swapped an argument would fail.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr
from jax_router import reference

from .util import assert_indices_match, random_bias, random_logits, options_for, selection_scores


class TEScoreFunction(enum.IntEnum):
    """TE's JAX enum: an IntEnum whose values are NOT ours (TE: SIGMOID=0, ours: SOFTMAX=0), so a
    lookup by value instead of by name would pick the wrong function."""

    SIGMOID = 0
    SOFTMAX = 1
    SQRTSOFTPLUS = 2


class PlainScoreFunction(enum.Enum):
    SOFTMAX = "sm"
    SIGMOID = "sg"
    SQRTSOFTPLUS = "ssp"


class TERoutingMapFormat(enum.IntEnum):
    BYTEMAP = 0
    BITMAP_U8 = 1


SPELLINGS = {
    "str": lambda name: name,
    "ours": lambda name: jr.ScoreFunction[name.upper()],
    "te_intenum": lambda name: TEScoreFunction[name.upper()],
    "plain_enum": lambda name: PlainScoreFunction[name.upper()],
}

T, E, K = 96, 64, 8

# (name, score_function, use_pre_softmax, with_bias, num_groups, group_topk, scaling_factor)
CASES = [
    ("mixtral-like", "softmax", False, False, -1, -1, None),
    ("pre-softmax", "softmax", True, False, -1, -1, 1.5),
    ("deepseek-v3-like", "sigmoid", False, True, 8, 4, 2.5),
    ("sigmoid-no-groups", "sigmoid", False, False, -1, -1, None),
    ("sqrtsoftplus-bias", "sqrtsoftplus", False, True, -1, -1, None),
    ("sqrtsoftplus-groups", "sqrtsoftplus", False, True, 4, 2, 1.0),
]


def _keyword_reference(logits, bias, fn, pre, groups, gtopk, scale, **kw):
    """The reference with the documented spellings only: strings, None for "off"."""
    return reference.fused_topk_with_score_function(
        logits, K, use_pre_softmax=pre,
        num_groups=None if groups == -1 else groups,
        group_topk=None if gtopk == -1 else gtopk,
        scaling_factor=scale, score_function=fn, expert_bias=bias, **kw)


def _assert_routing_matches(probs, ref_probs, idx, ref_idx, z, dtype=jnp.float32):
    """Indices equal the reference's (near-ties allowed to flip, see util); probs equal on the
    rows whose selection agrees."""
    assert_indices_match(idx, ref_idx, z)
    same_rows = (np.asarray(idx) == np.asarray(ref_idx)).all(-1)
    rtol = 2e-6 if jnp.dtype(dtype) == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(probs, np.float32)[same_rows],
                               np.asarray(ref_probs, np.float32)[same_rows], rtol=rtol,
                               atol=1e-7)


def _map_to_indices(routing_map, z):
    """Expert ids of a bool map, ordered as docs/semantics.md#forward-order orders slots (by z descending, then id)."""
    m, z = np.asarray(routing_map), np.asarray(z)
    order = np.lexsort((np.broadcast_to(np.arange(m.shape[-1]), m.shape), -z), axis=-1)
    ranked = np.take_along_axis(m, order, -1)
    return np.stack([row_order[row_mask][:K] for row_order, row_mask in zip(order, ranked)])


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_positional_te_order(case, spelling):
    _, fn, pre, with_bias, groups, gtopk, scale = case
    logits = random_logits(11, (T, E))
    bias = random_bias(11, E) if with_bias else None

    # TE's order: logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
    # score_function, expert_bias.
    probs, routing_map = jr.fused_topk_with_score_function(
        logits, K, pre, groups, gtopk, scale, SPELLINGS[spelling](fn), bias)
    ref_probs, ref_idx = _keyword_reference(logits, bias, fn, pre, groups, gtopk, scale,
                                            topk_indices_dtype=jnp.int32)

    assert probs.shape == (T, E) and probs.dtype == logits.dtype
    assert routing_map.shape == (T, E) and routing_map.dtype == jnp.bool_
    assert (np.asarray(routing_map).sum(-1) == K).all()
    opts = options_for(logits, K, use_pre_softmax=pre, score_function=fn, expert_bias=bias,
                       num_groups=None if groups == -1 else groups,
                       group_topk=None if gtopk == -1 else gtopk)
    z = selection_scores(logits, opts, bias)
    _assert_routing_matches(probs, ref_probs, _map_to_indices(routing_map, z), ref_idx, z)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_positional_then_dense_indices(case):
    """TE's positional prefix, then the dense-index request by keyword (the one addition a TE
    user makes to get expert ids instead of a map)."""
    _, fn, pre, with_bias, groups, gtopk, scale = case
    logits = random_logits(12, (4, T // 4, E), jnp.bfloat16)
    bias = random_bias(12, E, jnp.bfloat16) if with_bias else None
    probs, idx = jr.fused_topk_with_score_function(
        logits, K, pre, groups, gtopk, scale, TEScoreFunction[fn.upper()], bias,
        topk_indices_dtype=jnp.int16)
    ref_probs, ref_idx = _keyword_reference(logits, bias, fn, pre, groups, gtopk, scale,
                                            topk_indices_dtype=jnp.int16)
    assert idx.shape == (4, T // 4, K) and idx.dtype == jnp.int16
    opts = options_for(logits, K, use_pre_softmax=pre, score_function=fn, expert_bias=bias,
                       num_groups=None if groups == -1 else groups,
                       group_topk=None if gtopk == -1 else gtopk)
    z = selection_scores(logits, opts, bias)
    _assert_routing_matches(probs, ref_probs, idx, ref_idx, z, jnp.bfloat16)


@pytest.mark.parametrize("fn", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_no_group_spellings_agree(fn):
    """None, TE's -1 and TE's older default of 1 group keeping 1 give the same routing."""
    logits = random_logits(13, (T, E))
    bias = None if fn == "softmax" else random_bias(13, E)
    outs = [jr.fused_topk_with_score_function(logits, K, False, g, gk, None, fn, bias)
            for g, gk in ((None, None), (-1, -1), (1, 1), (-1, None))]
    for probs, routing_map in outs[1:]:
        np.testing.assert_array_equal(np.asarray(probs), np.asarray(outs[0][0]))
        np.testing.assert_array_equal(np.asarray(routing_map), np.asarray(outs[0][1]))
    assert np.asarray(outs[0][0]).any()


def test_scaling_factor_none_is_one():
    logits = random_logits(14, (T, E))
    bias = random_bias(14, E)
    p_none, m_none = jr.fused_topk_with_score_function(logits, K, False, -1, -1, None,
                                                       "sigmoid", bias)
    p_one, m_one = jr.fused_topk_with_score_function(logits, K, False, -1, -1, 1.0,
                                                     "sigmoid", bias)
    p_two, m_two = jr.fused_topk_with_score_function(logits, K, False, -1, -1, 2,
                                                     "sigmoid", bias)
    np.testing.assert_array_equal(np.asarray(p_none), np.asarray(p_one))
    np.testing.assert_array_equal(np.asarray(m_none), np.asarray(m_two))
    np.testing.assert_allclose(np.asarray(p_two), 2 * np.asarray(p_one), rtol=1e-6)
    # sigmoid weights of a row sum to 1 before scaling
    np.testing.assert_allclose(np.asarray(p_one).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["bitmap_u8", 1, np.int64(1), TERoutingMapFormat.BITMAP_U8,
                                 jr.RoutingMapFormat.BITMAP_U8], ids=repr)
def test_routing_map_format_positional(fmt):
    """The 9th positional argument is the map format (TE's PyTorch order); TE's integer and
    enum spellings of it are accepted."""
    logits = random_logits(15, (T, 130))
    bias = random_bias(15, 130)
    probs, bitmap = jr.fused_topk_with_score_function(
        logits, K, False, 10, 2, None, TEScoreFunction.SIGMOID, bias, fmt)
    ref_probs, ref_map = reference.fused_topk_with_score_function(
        logits, K, num_groups=10, group_topk=2, score_function="sigmoid", expert_bias=bias,
        routing_map_format="bytemap")
    assert bitmap.shape == (T, 17) and bitmap.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(bitmap), np.asarray(reference.pack_bitmap(ref_map)))
    np.testing.assert_allclose(np.asarray(probs), np.asarray(ref_probs), rtol=2e-6, atol=1e-7)
    for bytemap in (0, TERoutingMapFormat.BYTEMAP):
        _, m = jr.fused_topk_with_score_function(logits, K, False, 10, 2, None, "sigmoid", bias,
                                                 bytemap)
        np.testing.assert_array_equal(np.asarray(m), np.asarray(ref_map))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grad_positional(case):
    _, fn, pre, with_bias, groups, gtopk, scale = case
    logits = random_logits(16, (T, E))
    bias = random_bias(16, E) if with_bias else None
    w = jax.random.normal(jax.random.key(17), (T, E))

    def loss(x):
        probs, _ = jr.fused_topk_with_score_function(x, K, pre, groups, gtopk, scale,
                                                     TEScoreFunction[fn.upper()], bias)
        return jnp.sum(probs * w)

    def ref_loss(x):
        return jnp.sum(_keyword_reference(x, bias, fn, pre, groups, gtopk, scale)[0] * w)

    g, ref_g = jax.jit(jax.grad(loss))(logits), jax.jit(jax.grad(ref_loss))(logits)
    assert np.abs(np.asarray(ref_g)).max() > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-4, atol=1e-6)


def test_route_topk_takes_te_spellings():
    logits = random_logits(18, (T, E))
    bias = random_bias(18, E)
    w, idx = jr.route_topk(logits, K, num_groups=8, group_topk=4, scaling_factor=None,
                           score_function=TEScoreFunction.SQRTSOFTPLUS, expert_bias=bias)
    ref_w, ref_idx = reference.route_topk(logits, K, num_groups=8, group_topk=4,
                                          score_function="sqrtsoftplus", expert_bias=bias)
    opts = options_for(logits, K, score_function="sqrtsoftplus", expert_bias=bias,
                       num_groups=8, group_topk=4)
    z = selection_scores(logits, opts, bias)
    _assert_routing_matches(w, ref_w, idx, ref_idx, z)
    w2, idx2 = jr.route_topk(logits, K, num_groups=-1, group_topk=-1,
                             score_function=PlainScoreFunction.SOFTMAX)
    ref_w2, ref_idx2 = reference.route_topk(logits, K)
    _assert_routing_matches(w2, ref_w2, idx2, ref_idx2, np.asarray(logits))


# ---- aux-loss helpers ---------------------------------------------------------------------


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("fn", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_aux_scores_positional(fn, spelling):
    """(logits, topk, score_function[, routing_map_format]); returns (routing_map, scores)."""
    logits = random_logits(19, (T, E), jnp.bfloat16)
    routing_map, scores = jr.fused_compute_score_for_moe_aux_loss(logits, 4,
                                                                  SPELLINGS[spelling](fn))
    ref_map, ref_scores = reference.fused_compute_score_for_moe_aux_loss(logits, 4, fn)
    assert routing_map.dtype == jnp.bool_ and scores.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(scores).sum(-1), 1.0, rtol=1e-5)
    z = np.asarray(ref_scores)
    assert_indices_match(_map_to_indices(routing_map, z)[:, :4],
                         _map_to_indices(ref_map, z)[:, :4], z)

    bitmap, _ = jr.fused_compute_score_for_moe_aux_loss(logits, 4, SPELLINGS[spelling](fn), 1)
    np.testing.assert_array_equal(np.asarray(bitmap),
                                  np.asarray(reference.pack_bitmap(routing_map)))


def _aux_loss_numpy(probs, tpe, total, num_experts, topk, coeff):
    p = np.asarray(probs, np.float64)
    colsum = p.reshape(-1, p.shape[-1]).sum(0)
    return num_experts * coeff / (topk * total**2) * float(colsum @ np.asarray(tpe, np.float64))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_aux_loss_positional(dtype):
    """TE's (probs, tokens_per_expert, total_num_tokens, num_experts, topk, coeff)."""
    logits = random_logits(20, (T, E))
    probs, routing_map = jr.fused_topk_with_score_function(logits, K, False, -1, -1, None,
                                                           TEScoreFunction.SIGMOID)
    probs = probs.astype(dtype)
    tpe = jnp.sum(routing_map, axis=0, dtype=jnp.int32)
    loss = jr.fused_moe_aux_loss(probs, tpe, T, E, K, 1e-2)
    ref = reference.fused_moe_aux_loss(probs, tpe, T, E, K, 1e-2)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    np.testing.assert_allclose(float(loss), _aux_loss_numpy(probs, tpe, T, E, K, 1e-2),
                               rtol=1e-5)

    g = jax.grad(lambda p: jr.fused_moe_aux_loss(p, tpe, T, E, K, 1e-2))(probs)
    ref_g = jax.grad(lambda p: reference.fused_moe_aux_loss(p, tpe, T, E, K, 1e-2))(probs)
    assert g.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref_g, np.float32),
                               rtol=1e-6)


def test_aux_loss_from_te_four_argument_form():
    """TE's newer JAX form ``fused_moe_aux_loss(probs, tokens_per_expert, topk, coeff)`` takes
    T and E from probs' shape; the migration passes them explicitly. Also the sequence-level
    layout: cols = 2 * E."""
    probs = jax.nn.softmax(random_logits(21, (T, 2 * E)), axis=-1)
    tpe = jax.random.randint(jax.random.key(22), (2 * E,), 1, 50, jnp.int32)
    loss = jr.fused_moe_aux_loss(probs, tpe, probs.shape[0], E, K, 0.1)
    np.testing.assert_allclose(float(loss), _aux_loss_numpy(probs, tpe, T, E, K, 0.1), rtol=1e-5)
    full = jr.fused_moe_aux_loss(probs[:, :E], tpe[:E], *probs[:, :E].shape, K, 0.1)
    np.testing.assert_allclose(float(full),
                               _aux_loss_numpy(probs[:, :E], tpe[:E], T, E, K, 0.1), rtol=1e-5)


# ---- what a TE user might pass that we refuse (documented in docs/migration.md) ------------


def test_integer_score_function_is_refused():
    """TE's and our enums give the same names different integers, so a bare int is ambiguous."""
    logits = random_logits(23, (8, 16))
    for value in (0, 1, np.int32(2)):
        with pytest.raises(ValueError, match="score_function"):
            jr.fused_topk_with_score_function(logits, 2, False, -1, -1, None, value)


def test_te_compute_aux_scores_positional_is_refused():
    """TE's newer JAX signature has compute_aux_scores 9th; here the 9th is routing_map_format,
    so a stray bool fails loudly instead of being read as a format."""
    logits = random_logits(24, (8, 16))
    for flag in (False, True):
        with pytest.raises(ValueError, match="routing_map_format"):
            jr.fused_topk_with_score_function(logits, 2, False, -1, -1, 1.0, "softmax", None,
                                              flag)


def test_half_disabled_groups_are_refused():
    """TE turns grouping off when group_topk <= 0 whatever num_groups is; docs/semantics.md#validation asks for both
    or neither, so a config that sets only one is reported rather than silently ungrouped."""
    logits = random_logits(25, (8, 64))
    with pytest.raises(ValueError, match="num_groups and group_topk"):
        jr.fused_topk_with_score_function(logits, 8, False, 8, -1, None, "sigmoid")
