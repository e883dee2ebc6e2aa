"""Property tests (hypothesis): random options, shapes, dtypes and output modes; the kernels
agree with the pure-JAX reference, and the output invariants of docs/semantics.md#api and #forward always hold. On each
kernel implementation (`kernel_impl`): the pure-JAX one is the reference, and every hypothesis
example compiles its own programs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jax_router as jr
from jax_router import reference

from .util import RTOL, assert_indices_match, compare_to_reference

# function_scoped_fixture: the impl fixture is an immutable description of an implementation
# (and its device), the same for every example; nothing in it needs resetting between examples.
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

MODES = ["compact", "dense_i16", "dense_i32", "bytemap", "bitmap_u8"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def problems(draw, max_tokens=17, max_experts=70):
    """A valid routing call: options, logits, bias and output mode."""
    E = draw(st.integers(1, max_experts))
    score = draw(st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"]))
    pre = score == "softmax" and draw(st.booleans())
    if draw(st.booleans()):
        ng = draw(st.sampled_from(divisors(E)))
        gk = draw(st.integers(1, ng))
        per_group = draw(st.integers(1, E // ng))
        topk = gk * per_group
        # -1 / None mean "off"; here they are on
        groups = dict(num_groups=ng, group_topk=gk)
    else:
        topk = draw(st.integers(1, E))
        groups = draw(st.sampled_from([{}, dict(num_groups=-1, group_topk=-1)]))
    bias_dtype = None
    if score != "softmax" and draw(st.booleans()):
        bias_dtype = draw(st.sampled_from(list(DTYPES)))
    scaling = draw(st.sampled_from([None, 1.0, 2.5, 0.125, 16.0]))
    dtype = draw(st.sampled_from(list(DTYPES)))
    ndim = draw(st.integers(1, 3))
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    assume(math.prod(lead) <= max_tokens)
    mode = draw(st.sampled_from(MODES))
    use_buffer = mode.startswith("dense") and draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    # Exact ties in the raw logits, where selection uses them unchanged (softmax without
    # pre-softmax), so both sides compare identical scores and must pick the lower id.
    ties = score == "softmax" and not pre and draw(st.booleans())
    return dict(E=E, topk=topk, score=score, pre=pre, groups=groups, bias_dtype=bias_dtype,
                scaling=scaling, dtype=dtype, lead=lead, mode=mode, use_buffer=use_buffer,
                seed=seed, scale=scale, ties=ties)


def make_inputs(p):
    rng = np.random.default_rng(p["seed"])
    x = p["scale"] * rng.standard_normal(p["lead"] + (p["E"],), dtype=np.float32)
    if p["ties"]:
        x = np.round(x * 2) / 2
    logits = jnp.asarray(x.astype(DTYPES[p["dtype"]]))
    bias = None
    if p["bias_dtype"] is not None:
        b = 0.5 * rng.standard_normal((p["E"],), dtype=np.float32)
        bias = jnp.asarray(b.astype(DTYPES[p["bias_dtype"]]))
    return logits, bias


def route_kwargs(p, bias):
    kw = dict(score_function=p["score"], use_pre_softmax=p["pre"], scaling_factor=p["scaling"],
              **p["groups"])
    if bias is not None:
        kw["expert_bias"] = bias
    return kw


def impl_call(impl, p, logits, bias, buf=None):
    """The drawn output mode through `impl`; returns (float output, ints/map)."""
    kw = route_kwargs(p, bias)
    mode = p["mode"]
    if mode == "compact":
        return impl.route_topk(logits, p["topk"], **kw)
    if mode.startswith("dense"):
        dt = jnp.int16 if mode == "dense_i16" else jnp.int32
        if buf is not None:
            return impl.fused_topk_with_score_function(logits, p["topk"], topk_indices=buf, **kw)
        return impl.fused_topk_with_score_function(logits, p["topk"], topk_indices_dtype=dt,
                                                   **kw)
    fmt = "bitmap_u8" if mode == "bitmap_u8" else "bytemap"
    return impl.fused_topk_with_score_function(logits, p["topk"], routing_map_format=fmt, **kw)


def selection_z(logits, p, bias):
    """Reference selection scores z (as tests/util.selection_scores, but traceable)."""
    x = logits.astype(jnp.float32)
    fn = jr.options.score_function_of(p["score"])
    if fn == jr.ScoreFunction.SOFTMAX:
        return jax.nn.softmax(x, axis=-1) if p["pre"] else x
    z = reference.activation(fn, x)
    return z + bias.astype(jnp.float32) if bias is not None else z


def buffer_for(p):
    if not p["use_buffer"]:
        return None
    dt = jnp.int16 if p["mode"] == "dense_i16" else jnp.int32
    return jnp.full(p["lead"] + (p["topk"],), -7, dt)  # poison: must never show


def run_everything(impl, p, logits, bias):
    """The output of `impl`, its compact indices, reference outputs and z: one program."""

    def fn(logits, bias, buf):
        kw = route_kwargs(p, bias)
        out = impl_call(impl, p, logits, bias, buf)
        idx = impl.route_topk(logits, p["topk"], **kw)[1]
        ref_w, ref_idx = reference.route_topk(logits, p["topk"], **kw)
        ref_probs, ref_map = reference.fused_topk_with_score_function(logits, p["topk"], **kw)
        return out, idx, (ref_w, ref_idx, ref_probs, ref_map), selection_z(logits, p, bias)

    res = jax.jit(fn)(logits, bias, buffer_for(p))
    return jax.tree.map(np.asarray, res)


def group_boundary_near_tie(z_row, p, rtol=1e-5):
    """True when the last kept group and the first dropped one have near-equal scores (a
    ulp-level difference between kernel and XLA math may then keep the other group)."""
    ng, gk = p["groups"].get("num_groups", -1), p["groups"].get("group_topk", -1)
    if gk <= 0 or gk == ng:
        return False
    m = p["topk"] // gk
    g = np.sort(np.asarray(z_row, np.float64).reshape(ng, -1), axis=-1)[:, ::-1][:, :m].sum(-1)
    g = np.sort(g)[::-1]
    return bool(np.isclose(g[gk - 1], g[gk], rtol=rtol, atol=1e-7) and g[gk - 1] != g[gk])


def check_against_reference(p, res):
    out, idx, (ref_w, ref_idx, ref_probs, ref_map), z = res
    E, k, lead = p["E"], p["topk"], p["lead"]
    dtype = jnp.dtype(DTYPES[p["dtype"]])
    mode = p["mode"]

    # -- shapes and dtypes of the drawn mode
    first, second = out
    if mode == "compact":
        assert first.shape == lead + (k,) and first.dtype == np.float32
        assert second.shape == lead + (k,) and second.dtype == np.int32
    else:
        assert first.shape == lead + (E,) and first.dtype == dtype
        if mode.startswith("dense"):
            assert second.shape == lead + (k,)
            assert second.dtype == (np.int16 if mode == "dense_i16" else np.int32)
        elif mode == "bytemap":
            assert second.shape == lead + (E,) and second.dtype == np.bool_
        else:
            assert second.shape == lead + ((E + 7) // 8,) and second.dtype == np.uint8

    # -- indices: equal to the reference's, but for numeric near-ties
    flat_z = z.reshape(-1, E)
    rows_idx, rows_ref = idx.reshape(-1, k), ref_idx.reshape(-1, k)
    keep = np.array([(a == b).all() or not group_boundary_near_tie(zr, p)
                     for a, b, zr in zip(rows_idx, rows_ref, flat_z)], bool)
    assert_indices_match(rows_idx[keep], rows_ref[keep], flat_z[keep])
    same_rows = (rows_idx == rows_ref).all(-1)  # rows where the selection is identical

    # -- the drawn mode is consistent with the compact indices
    onehot = np.zeros((rows_idx.shape[0], E), bool)
    np.put_along_axis(onehot, rows_idx.astype(np.int64), True, axis=-1)
    if mode.startswith("dense") or mode == "compact":
        np.testing.assert_array_equal(second.reshape(-1, k), rows_idx)
    elif mode == "bytemap":
        np.testing.assert_array_equal(second.reshape(-1, E), onehot)
    else:
        packed = np.packbits(onehot, axis=-1, bitorder="little")  # bit e % 8 of byte e // 8
        np.testing.assert_array_equal(second.reshape(-1, (E + 7) // 8), packed)
    if mode != "compact":
        # probs are zero off the selection
        assert (first.reshape(-1, E)[~onehot].astype(np.float32) == 0).all()

    # -- weights / probs against the reference on identical rows
    if mode == "compact":
        compare_to_reference(first.reshape(-1, k)[same_rows], ref_w.reshape(-1, k)[same_rows],
                             jnp.float32, "weights")
    else:
        compare_to_reference(first.reshape(-1, E)[same_rows], ref_probs.reshape(-1, E)[same_rows],
                             dtype, "probs")
        if mode == "bytemap":
            np.testing.assert_array_equal(second.reshape(-1, E)[same_rows],
                                          ref_map.reshape(-1, E)[same_rows])


@SETTINGS
@given(problems())
def test_kernels_match_reference(kernel_impl, p):
    logits, bias = make_inputs(p)
    check_against_reference(p, run_everything(kernel_impl, p, logits, bias))


# ---- invariants without a reference ------------------------------------------------------


def assert_valid_indices(idx, E, k):
    idx = np.asarray(idx).astype(np.int64).reshape(-1, k)
    assert ((idx >= 0) & (idx < E)).all(), f"index out of range: {idx}"
    for row in idx:
        assert len(set(row.tolist())) == k, f"repeated index in row {row}"


@st.composite
def nonfinite_problems(draw):
    p = draw(problems())
    n = math.prod(p["lead"]) * p["E"]
    # per element: 0 keep, 1 NaN, 2 +inf, 3 -inf; biased towards many special values
    p["mask"] = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3]), min_size=n, max_size=n))
    p["row_fill"] = draw(st.sampled_from([None, "nan", "inf", "-inf"]))
    p["bias_mask"] = draw(st.lists(st.sampled_from([0, 0, 0, 1, 2, 3]), min_size=p["E"],
                                   max_size=p["E"]))
    return p


SPECIAL = np.array([0.0, np.nan, np.inf, -np.inf], np.float32)


@SETTINGS
@given(nonfinite_problems())
def test_indices_valid_with_nan_and_inf(kernel_impl, p):
    E, k, lead = p["E"], p["topk"], p["lead"]
    rng = np.random.default_rng(p["seed"])
    x = p["scale"] * rng.standard_normal(lead + (E,), dtype=np.float32)
    mask = np.asarray(p["mask"], np.int64).reshape(lead + (E,))
    x = np.where(mask > 0, SPECIAL[mask], x)
    if p["row_fill"] is not None and x.size:
        x.reshape(-1, E)[0] = np.float32(p["row_fill"])  # one whole row of one special value
    logits = jnp.asarray(x.astype(DTYPES[p["dtype"]]))
    bias = None
    if p["bias_dtype"] is not None:
        b = 0.5 * rng.standard_normal((E,), dtype=np.float32)
        bm = np.asarray(p["bias_mask"], np.int64)
        b = np.where(bm > 0, SPECIAL[bm], b)
        bias = jnp.asarray(b.astype(DTYPES[p["bias_dtype"]]))

    kw = route_kwargs(p, bias)
    _, idx = kernel_impl.route_topk(logits, k, **kw)
    assert_valid_indices(idx, E, k)
    out = impl_call(kernel_impl, p, logits, bias, buffer_for(p))
    second = np.asarray(out[1])
    if p["mode"].startswith("dense") or p["mode"] == "compact":
        assert_valid_indices(second, E, k)
        np.testing.assert_array_equal(second.reshape(-1, k), np.asarray(idx).reshape(-1, k))
    elif p["mode"] == "bytemap":
        assert (second.reshape(-1, E).sum(-1) == k).all()
    else:
        bits = np.unpackbits(second.reshape(-1, (E + 7) // 8), axis=-1, bitorder="little")
        assert (bits[:, E:] == 0).all(), "bitmap padding bits set"
        assert (bits.sum(-1) == k).all()


@SETTINGS
@given(problems())
def test_weights_sum_to_scaling_factor(kernel_impl, p):
    """Normalised score functions: each row's weights sum to scaling_factor (finite inputs)."""
    assume(not p["pre"])
    assume(p["score"] == "softmax" or p["topk"] > 1)
    logits, bias = make_inputs(p)
    scale = 1.0 if p["scaling"] is None else p["scaling"]
    kw = route_kwargs(p, bias)
    w, _ = kernel_impl.route_topk(logits, p["topk"], **kw)
    np.testing.assert_allclose(np.asarray(w).sum(-1), scale, rtol=1e-5)
    if p["mode"] != "compact":
        probs = np.asarray(impl_call(kernel_impl, p, logits, bias, buffer_for(p))[0], np.float32)
        rtol = max(RTOL[jnp.dtype(DTYPES[p["dtype"]])], 1e-5)
        np.testing.assert_allclose(probs.sum(-1), scale, rtol=rtol * 2)
        assert (probs >= 0).all()
    assert (np.asarray(w) >= 0).all()
