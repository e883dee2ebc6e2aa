"""Forward pass: every output mode of each implementation against the pure-JAX reference.

The option grids and size sweeps run on the kernels (`kernel_impl`): the pure-JAX implementation
is the reference itself, so there they would only spend compile time; the semantic checks that
also hold for it run on every implementation (`impl`)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr
from jax_router.reference import pack_bitmap

from .util import (
    SCORE_CONFIGS,
    SCORE_IDS,
    FLOAT_DTYPES,
    assert_indices_match,
    compare_to_reference,
    options_for,
    random_bias,
    random_logits,
    selection_scores,
)

# (score_function, use_pre_softmax, with_bias)


def _kwargs(E, score, pre, bias, groups, scaling, seed):
    kw = dict(score_function=score, use_pre_softmax=pre, scaling_factor=scaling)
    if bias:
        kw["expert_bias"] = random_bias(seed, E)
    if groups:
        kw["num_groups"], kw["group_topk"] = groups
    return kw


def _all_modes(impl, logits, bias, topk, kw, index_dtypes):
    """Every output mode of `impl` and of the reference, traced into one jit program."""
    kw = dict(kw, expert_bias=bias)
    out = {"ref": jr.reference.route_topk(logits, topk, **kw),
           "ref_probs": jr.reference.fused_topk_with_score_function(logits, topk, **kw)}
    for idt in index_dtypes:
        name = jnp.dtype(idt).name
        out["compact_" + name] = impl.route_topk(logits, topk, index_dtype=idt, **kw)
        out["dense_" + name] = impl.fused_topk_with_score_function(
            logits, topk, topk_indices_dtype=idt, **kw)
    out["bytemap"] = impl.fused_topk_with_score_function(logits, topk, **kw)
    out["bitmap"] = impl.fused_topk_with_score_function(
        logits, topk, routing_map_format="bitmap_u8", **kw)
    return out


def check_all_modes(impl, logits, topk, kw, *, index_dtypes=(jnp.int16, jnp.int32)):
    """Runs every output mode through `impl` and checks it against the reference."""
    dtype = logits.dtype
    E = logits.shape[-1]
    index_dtypes = tuple(d for d in index_dtypes if not (d == jnp.int16 and E > 32767))
    bias = kw.pop("expert_bias", None)
    opts = options_for(logits, topk, expert_bias=bias, **kw)
    z = selection_scores(logits, opts, bias)
    out = _jit_all_modes(impl, logits, bias, topk, kw, index_dtypes)
    ref_w, ref_idx = out["ref"]
    ref_probs, ref_map = out["ref_probs"]
    ref_probs = np.asarray(ref_probs, np.float32)
    lead = logits.shape[:-1]

    for idt in index_dtypes:
        name = jnp.dtype(idt).name
        w, idx = out["compact_" + name]
        assert w.dtype == jnp.float32 and idx.dtype == idt
        assert w.shape == idx.shape == lead + (topk,)
        assert_indices_match(idx, ref_idx, z)
        same = np.asarray(idx) == np.asarray(ref_idx)
        compare_to_reference(np.where(same, w, 0), np.where(same, ref_w, 0), jnp.float32, "w")

        probs, didx = out["dense_" + name]
        assert probs.dtype == dtype and probs.shape == logits.shape and didx.dtype == idt
        np.testing.assert_array_equal(didx, idx)
        if same.all():
            compare_to_reference(probs, ref_probs, dtype, "probs (dense)")

    probs, bmap = out["bytemap"]
    assert bmap.dtype == jnp.bool_ and bmap.shape == logits.shape
    assert (np.asarray(bmap).sum(-1) == topk).all()
    if same.all():
        np.testing.assert_array_equal(bmap, ref_map)
        compare_to_reference(probs, ref_probs, dtype, "probs (bytemap)")
    # The map marks exactly the dense indices.
    np.testing.assert_array_equal(
        bmap, np.asarray(jax.nn.one_hot(idx, E, dtype=jnp.int32).sum(-2)) > 0)

    probs_b, bits = out["bitmap"]
    assert bits.dtype == jnp.uint8 and bits.shape == lead + ((E + 7) // 8,)
    np.testing.assert_array_equal(bits, pack_bitmap(bmap))
    np.testing.assert_array_equal(probs_b, probs)


def _jit_all_modes(impl, logits, bias, topk, kw, index_dtypes):
    fn = jax.jit(lambda x, b: _all_modes(impl, x, b, topk, kw, index_dtypes))
    return jax.tree.map(np.asarray, fn(logits, bias))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("groups", [None, (4, 2)], ids=["nogroups", "groups4-2"])
@pytest.mark.parametrize("score,pre,bias", SCORE_CONFIGS, ids=SCORE_IDS)
@pytest.mark.parametrize("topk", [1, 2, 4, 8])
def test_option_grid(kernel_impl, topk, score, pre, bias, groups, dtype):
    E, T = 32, 37
    if groups and topk % groups[1]:
        pytest.skip("topk must be a multiple of group_topk")
    seed = hash((topk, score, pre, bias, groups, jnp.dtype(dtype).name)) % 10_000
    scaling = 2.5 if seed % 2 else None
    logits = random_logits(seed, (T, E), dtype)
    check_all_modes(kernel_impl, logits, topk, _kwargs(E, score, pre, bias, groups, scaling, seed))


SHAPES = [(E, k) for E, k in itertools.product([8, 32, 130, 256, 1024], [1, 2, 4, 8, 16, 32])
          if k <= E]


@pytest.mark.parametrize("E,topk", SHAPES, ids=[f"E{E}-k{k}" for E, k in SHAPES])
@pytest.mark.parametrize("score,pre,bias", [("softmax", False, False), ("sigmoid", False, True),
                                            ("softmax", True, False)],
                         ids=["softmax", "sigmoid-bias", "softmax-pre"])
def test_expert_and_topk_sizes(kernel_impl, E, topk, score, pre, bias):
    dtype = jnp.bfloat16 if (E + topk) % 2 else jnp.float32
    logits = random_logits(E * 100 + topk, (19, E), dtype)
    groups = None
    if E % 8 == 0 and topk % 4 == 0 and topk // 4 <= E // 8:
        groups = (8, 4)
    check_all_modes(kernel_impl, logits, topk, _kwargs(E, score, pre, bias, groups, 1.5, E + topk),
                    index_dtypes=(jnp.int32,))


@pytest.mark.parametrize("E,topk", [(7, 7), (130, 130), (33, 32), (1, 1), (2, 1), (1024, 1000)])
def test_topk_near_or_equal_E(kernel_impl, E, topk):
    logits = random_logits(E + topk, (9, E), jnp.float32)
    for kw in (dict(score_function="sigmoid"), dict()):
        check_all_modes(kernel_impl, logits, topk, kw, index_dtypes=(jnp.int32,))


@pytest.mark.parametrize("lead", [(0,), (1,), (2, 3), (2, 0, 5), (2, 3, 4), (1, 2, 3, 2)],
                         ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_token_counts_and_leading_dims(kernel_impl, lead, dtype):
    E, topk = 24, 6
    logits = random_logits(len(lead) + sum(lead), lead + (E,), dtype)
    kw = _kwargs(E, "sigmoid", False, True, (6, 3), 2.0, 3)
    check_all_modes(kernel_impl, logits, topk, kw)
    # Leading dims are only rows: the result equals the flattened call, reshaped.
    w, idx = kernel_impl.route_topk(logits, topk, **kw)
    w2, idx2 = kernel_impl.route_topk(logits.reshape(-1, E), topk, **kw)
    np.testing.assert_array_equal(idx, np.asarray(idx2).reshape(idx.shape))
    np.testing.assert_array_equal(w, np.asarray(w2).reshape(w.shape))


def test_int64_indices(impl):
    with jax.enable_x64(True):
        logits = random_logits(5, (11, 40), jnp.float32)
        check_all_modes(impl, logits, 5, dict(score_function="sigmoid"), index_dtypes=(jnp.int64,))


def test_rows_are_independent_of_the_batch(kernel_impl):
    """A row's result does not depend on which other rows are in the batch."""
    logits = random_logits(8, (300, 64), jnp.bfloat16)
    kw = _kwargs(64, "sigmoid", False, True, (8, 4), 2.5, 8)
    w, idx = kernel_impl.route_topk(logits, 8, **kw)
    for sl in (slice(0, 1), slice(17, 18), slice(100, 163), slice(299, 300)):
        ws, idxs = kernel_impl.route_topk(logits[sl], 8, **kw)
        np.testing.assert_array_equal(idxs, idx[sl])
        np.testing.assert_array_equal(ws, w[sl])


def test_repeatable_bitwise(kernel_impl):
    logits = random_logits(9, (513, 256), jnp.float32)
    kw = _kwargs(256, "sqrtsoftplus", False, True, (8, 4), 2.5, 9)
    first = kernel_impl.fused_topk_with_score_function(logits, 8, **kw)
    for _ in range(3):
        again = kernel_impl.fused_topk_with_score_function(logits, 8, **kw)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


def test_bfloat16_outputs_are_finite(impl):
    logits = random_logits(10, (256, 256), jnp.bfloat16, scale=30.0)
    for kw in (dict(), dict(use_pre_softmax=True), dict(score_function="sigmoid"),
               dict(score_function="sqrtsoftplus", expert_bias=random_bias(1, 256))):
        probs, idx = impl.fused_topk_with_score_function(
            logits, 8, topk_indices_dtype=jnp.int32, **kw)
        w, _ = impl.route_topk(logits, 8, **kw)
        assert np.isfinite(np.asarray(probs, np.float32)).all()
        assert np.isfinite(np.asarray(w)).all()
