"""The order and tie rules (docs/semantics.md#forward-order), on rows built to tie: every implementation must match exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr

from .util import FLOAT_DTYPES, random_logits


def route_idx(x, k, impl, **kw):
    return np.asarray(impl.route_topk(jnp.asarray(x), k, **kw)[1])


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_all_equal_row_picks_lowest_ids_in_order(impl, score, dtype):
    x = jnp.full((3, 37), 0.75, dtype)
    for k in (1, 5, 37):
        np.testing.assert_array_equal(route_idx(x, k, impl, score_function=score),
                                      np.tile(np.arange(k), (3, 1)))


def test_ties_between_experts(impl):
    x = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 2.0]], np.float32)
    np.testing.assert_array_equal(route_idx(x, 3, impl), [[1, 2, 4]])
    np.testing.assert_array_equal(route_idx(x, 5, impl), [[1, 2, 4, 3, 5]])


def test_equal_scores_from_bias(impl):
    # sigmoid(0) + 0.25 == sigmoid(0) + 0.25: expert 3 and expert 1 tie, 1 wins.
    x = np.zeros((1, 4), np.float32)
    bias = jnp.array([0.0, 0.25, -0.5, 0.25])
    np.testing.assert_array_equal(
        route_idx(x, 2, impl, score_function="sigmoid", expert_bias=bias), [[1, 3]])


def test_group_ties_go_to_the_lower_group(impl):
    # 4 groups of 2, keep 2, one expert per kept group.
    x = np.array([[5, 0, 5, 0, 5, 0, 5, 0],
                  [0, 0, 5, 1, 0, 0, 5, 1],
                  [1, 2, 2, 1, 0, 3, 3, 0]], np.float32)
    idx = route_idx(x, 2, impl, num_groups=4, group_topk=2)
    np.testing.assert_array_equal(idx, [[0, 2], [2, 6], [5, 6]])


def test_group_score_sums_top_values(impl):
    # Group scores are sums of the top-2: g0 = 9 + 1, g1 = 6 + 5 wins over g0 although g0
    # holds the best expert; g2 = 10 + 0 ties g0 and loses to it (lower id).
    x = np.array([[9, 1, 0, 6, 5, 0, 10, 0, -1]], np.float32)
    idx = route_idx(x, 2, impl, num_groups=3, group_topk=1)
    np.testing.assert_array_equal(idx, [[3, 4]])
    idx = route_idx(x, 4, impl, num_groups=3, group_topk=2)
    np.testing.assert_array_equal(idx, [[0, 3, 4, 1]])


def test_signed_zeros_order_as_in_lax_top_k(impl):
    x = np.array([[-0.0, 0.0, -0.0, -1.0]], np.float32)
    np.testing.assert_array_equal(route_idx(x, 3, impl), [[1, 0, 2]])


def test_nan_ranks_below_minus_inf(impl):
    nan, inf = np.nan, np.inf
    x = np.array([[nan, -inf, 1.0, nan, inf],
                  [nan, nan, nan, nan, nan],
                  [-inf, nan, -inf, nan, -inf]], np.float32)
    np.testing.assert_array_equal(route_idx(x, 5, impl),
                                  [[4, 2, 1, 0, 3], [0, 1, 2, 3, 4], [0, 2, 4, 1, 3]])
    np.testing.assert_array_equal(route_idx(x, 3, impl), [[4, 2, 1], [0, 1, 2], [0, 2, 4]])


def test_excluded_experts_rank_below_nan(impl):
    # Both group scores (sums of the top 2) are NaN: they tie and group 0 is kept. Its NaN
    # expert is then chosen over expert 5 (2.0) of the dropped group.
    nan = np.nan
    x = np.array([[nan, nan, 1.0, nan, nan, 2.0]], np.float32)
    np.testing.assert_array_equal(route_idx(x, 2, impl, num_groups=2, group_topk=1), [[2, 0]])
    # A NaN group score ranks below a real one.
    y = np.array([[nan, 1.0, nan, -9.0, -9.0, -9.0]], np.float32)
    np.testing.assert_array_equal(route_idx(y, 2, impl, num_groups=2, group_topk=1), [[3, 4]])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("k", [1, 3, 8, 40])
def test_order_equals_lax_top_k(impl, dtype, k):
    """For NaN-free raw-logit selection the slots are exactly jax.lax.top_k's."""
    # A coarse grid makes exact ties frequent.
    x = jnp.round(random_logits(k, (257, 48), jnp.float32) * 2) / 2
    x = x.astype(dtype)
    want = np.asarray(jax.lax.top_k(x.astype(jnp.float32), k)[1])
    np.testing.assert_array_equal(route_idx(x, k, impl), want)
    _, didx = impl.fused_topk_with_score_function(x, k, topk_indices_dtype=jnp.int32)
    np.testing.assert_array_equal(didx, want)


@pytest.mark.parametrize("score", ["sigmoid", "sqrtsoftplus"])
def test_tied_grid_matches_reference_exactly(impl, score):
    """bf16 logits on a grid: many exact ties; distinct values are far apart."""
    x = (jnp.round(random_logits(3, (401, 64), jnp.float32) * 4) / 4).astype(jnp.bfloat16)
    bias = jnp.round(random_logits(4, (64,), jnp.float32) * 8) / 64
    kw = dict(score_function=score, expert_bias=bias, num_groups=8, group_topk=4)
    want = np.asarray(jr.reference.route_topk(x, 8, **kw)[1])
    np.testing.assert_array_equal(route_idx(x, 8, impl, **kw), want)
