"""Quantile-balancing routing (docs/semantics.md#qb): route_topk_qb and
fused_topk_with_score_function_qb on every implementation, against the pure-JAX reference; ties
at the cutoff, NaN / inf rows, the histogram's clamp edges and accumulation, shapes, gradients,
validation, and token sharding over the 8 host CPU devices."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.test_util import check_grads
from jax.sharding import PartitionSpec as P

import jax_router as jr

from .util import FLOAT_DTYPES, RTOL, assert_indices_match, random_bias, random_logits

BOUNDS = np.array([-1.0, 1.0], np.float32)


def reference_z(x, bias):
    s = jr.reference.activation(jr.ScoreFunction.SIGMOID, jnp.asarray(x).astype(jnp.float32))
    return np.asarray(s + jnp.asarray(bias).astype(jnp.float32)), np.asarray(s)


def near_edge_count(x, bias, cutoff, bounds, num_bins, tol=1e-4):
    """Elements whose reference bin value v lies within `tol` bins of a bin edge (a one-ulp
    difference in the sigmoid may move them to the neighbouring bin)."""
    _, s = reference_z(x, bias)
    lo, hi = (float(b) for b in bounds)
    v = ((np.asarray(cutoff, np.float64).reshape(-1, 1) - s.reshape(len(cutoff), -1)) - lo) * (
        num_bins / (hi - lo))
    return int(np.count_nonzero(np.abs(v - np.round(v)) < tol))


def check_against_reference(out, ref, x, bias, k, num_bins, dtype, hist0=None):
    w, idx, cutoff, hist = (np.asarray(o) for o in out)
    rw, ridx, rcut, rhist = (np.asarray(o) for o in ref)
    E = x.shape[-1]
    T = int(np.prod(x.shape[:-1]))
    z, _ = reference_z(x, bias)
    assert_indices_match(idx, ridx, z)
    same = (idx == ridx).all(axis=-1)
    np.testing.assert_allclose(w[same], rw[same], rtol=RTOL[jnp.dtype(jnp.float32)], atol=1e-7)
    np.testing.assert_allclose(cutoff, rcut, rtol=2e-6, atol=1e-7)
    base = 0 if hist0 is None else np.asarray(hist0).sum(axis=1)
    assert hist.dtype == np.int32 and hist.shape == (E, num_bins)
    assert (hist.sum(axis=1) == base + T).all(), "every expert counts every row once"
    moved = np.abs(hist.astype(np.int64) - rhist).sum()
    assert moved <= 2 * near_edge_count(x, bias, cutoff.reshape(-1), BOUNDS, num_bins), moved


# ---- against the reference -----------------------------------------------------------------

# (E, topk): topk + 1 == E, odd E, Kimi-K3's 896/16, topk up to 32, E up to 2048
SHAPES = [(2, 1), (8, 7), (17, 3), (37, 5), (130, 8), (896, 16), (1024, 32), (2048, 32)]


@pytest.mark.parametrize("E,k", SHAPES, ids=[f"E{E}-k{k}" for E, k in SHAPES])
def test_matches_reference(kernel_impl, E, k):
    dtype = FLOAT_DTYPES[E % 3]
    x = random_logits(E, (96 if E <= 1024 else 24, E), dtype)
    bias = random_bias(E, E)
    hist0 = jnp.asarray(np.random.default_rng(E).integers(0, 9, (E, 50)), jnp.int32)
    out = kernel_impl.route_topk_qb(x, k, bias, BOUNDS, 50, hist0, scaling_factor=1.5)
    ref = jr.reference.route_topk_qb(x, k, bias, BOUNDS, 50, hist0, scaling_factor=1.5)
    check_against_reference(out, ref, x, bias, k, 50, dtype, hist0)


@pytest.mark.parametrize("index_dtype", [jnp.int16, jnp.int32])
@pytest.mark.parametrize("mode", ["bytemap", "bitmap_u8", "dense"])
def test_fused_outputs(impl, mode, index_dtype):
    E, k = 64, 6
    x = random_logits(3, (4, 33, E), jnp.bfloat16)
    bias = random_bias(3, E)
    kw = dict(topk_indices_dtype=index_dtype) if mode == "dense" else dict(routing_map_format=mode)
    probs, routing, cutoff, hist = impl.fused_topk_with_score_function_qb(
        x, k, bias, BOUNDS, 16, scaling_factor=2.0, **kw)
    w, idx, cutoff_c, hist_c = impl.route_topk_qb(x, k, bias, BOUNDS, 16, scaling_factor=2.0,
                                                  index_dtype=index_dtype)
    assert probs.shape == x.shape and probs.dtype == x.dtype and cutoff.shape == x.shape[:-1]
    np.testing.assert_array_equal(np.asarray(cutoff), np.asarray(cutoff_c))
    np.testing.assert_array_equal(np.asarray(hist), np.asarray(hist_c))
    dense = np.asarray(jr.reference.scatter_rows(idx, w, E, jnp.float32))
    np.testing.assert_allclose(np.asarray(probs, np.float32), dense, rtol=1e-2)
    if mode == "dense":
        assert routing.dtype == index_dtype
        np.testing.assert_array_equal(np.asarray(routing), np.asarray(idx))
    else:
        bytemap = np.asarray(jr.reference.scatter_rows(idx, jnp.ones(idx.shape, bool), E, bool))
        want = bytemap if mode == "bytemap" else np.asarray(jr.reference.pack_bitmap(bytemap))
        np.testing.assert_array_equal(np.asarray(routing), want)


def test_same_selection_as_plain_router(impl):
    """QB keeps exactly route_topk's sigmoid + bias selection and weights."""
    x = random_logits(5, (200, 96), jnp.float32)
    bias = random_bias(5, 96)
    w, idx, _, _ = impl.route_topk_qb(x, 8, bias, BOUNDS, 10)
    pw, pidx = impl.route_topk(x, 8, score_function="sigmoid", expert_bias=bias)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(pidx))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(pw))


# ---- ties, NaN / inf, clamp edges ------------------------------------------------------------


def test_ties_at_the_cutoff(impl):
    E, k = 12, 4
    rows = np.zeros((3, E), np.float32)  # row 0: all tied
    rows[1] = np.linspace(3, -3, E)  # row 1: experts 3 and 9 tie at the boundary
    rows[1, 9] = rows[1, 3]
    rows[2, [2, 5, 7, 11]] = 5.0  # row 2: four tied winners, the rest tied below
    out = impl.route_topk_qb(rows, k, np.zeros(E, np.float32), BOUNDS, 8)
    idx, cutoff = np.asarray(out[1]), np.asarray(out[2])
    np.testing.assert_array_equal(idx[0], [0, 1, 2, 3])  # the higher ids are dropped
    np.testing.assert_array_equal(idx[1], [0, 1, 2, 3])
    np.testing.assert_array_equal(idx[2], [2, 5, 7, 11])
    s0 = np.asarray(jr.reference.activation(jr.ScoreFunction.SIGMOID, jnp.float32(0.0)))
    np.testing.assert_allclose(cutoff, [s0, cutoff[1], s0], rtol=1e-6)
    # row 1's cutoff is expert 9's score (tied with 3, the one kept): in the reference too
    ref_cut = np.asarray(jr.reference.route_topk_qb(rows, k, np.zeros(E, np.float32), BOUNDS,
                                                    8)[2])
    np.testing.assert_allclose(cutoff[1], ref_cut[1], rtol=1e-6)


def test_nan_and_inf_rows(impl):
    E, k = 16, 3
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    rows = np.stack([
        np.full(E, nan), np.full(E, inf), np.full(E, -inf),
        np.where(np.arange(E) % 2 == 0, nan, -inf),
        np.where(np.arange(E) == 5, np.float32(1.0), nan),
        np.where(np.arange(E) % 4 == 0, inf, np.float32(0.25) * np.arange(E)),
    ]).astype(np.float32)
    w, idx, cutoff, hist = (np.asarray(o) for o in impl.route_topk_qb(
        rows, k, np.zeros(E, np.float32), BOUNDS, 8))
    assert ((idx >= 0) & (idx < E)).all()
    assert all(len(set(r.tolist())) == k for r in idx)
    assert (hist.sum(axis=1) == len(rows)).all()
    assert np.isnan(cutoff[0]) and cutoff[3] == 0.0  # row 3: sigmoid(-inf) = 0 ranks above NaN
    np.testing.assert_array_equal(idx[4][:1], [5])  # the one number ranks above every NaN
    ref = [np.asarray(o) for o in jr.reference.route_topk_qb(rows, k, np.zeros(E, np.float32),
                                                             BOUNDS, 8)]
    np.testing.assert_array_equal(idx, ref[1])
    np.testing.assert_array_equal(hist, ref[3])  # NaN and inf rows bin exactly: 0 and the edges


@pytest.mark.parametrize("bounds,edge", [((10.0, 11.0), 0), ((-11.0, -10.0), -1)],
                         ids=["below-lower", "above-upper"])
def test_histogram_clamp_edges(impl, bounds, edge):
    x = random_logits(7, (50, 24), jnp.float32)
    hist = np.asarray(impl.route_topk_qb(x, 4, None, np.array(bounds, np.float32), 6)[3])
    want = np.zeros((24, 6), np.int32)
    want[:, edge] = 50
    np.testing.assert_array_equal(hist, want)


def test_histogram_accumulates(impl):
    x = random_logits(8, (40, 32), jnp.float32)
    bias = random_bias(8, 32)
    h0 = jnp.asarray(np.random.default_rng(0).integers(0, 100, (32, 20)), jnp.int32)
    fresh = np.asarray(impl.route_topk_qb(x, 5, bias, BOUNDS, 20)[3])
    acc = np.asarray(impl.route_topk_qb(x, 5, bias, BOUNDS, 20, h0)[3])
    np.testing.assert_array_equal(acc, np.asarray(h0) + fresh)
    # under jit with the histogram donated (the kernels accumulate in place)
    f = impl.jit(lambda x, h: impl.route_topk_qb(x, 5, bias, BOUNDS, 20, h)[3],
                 donate_argnums=(1,))
    np.testing.assert_array_equal(np.asarray(f(x, jnp.array(h0))), np.asarray(h0) + fresh)


def test_traced_bounds(impl):
    x = random_logits(9, (30, 16), jnp.float32)
    f = impl.jit(lambda x, b: impl.route_topk_qb(x, 2, None, b, 4)[3])
    np.testing.assert_array_equal(np.asarray(f(x, jnp.asarray(BOUNDS))),
                                  np.asarray(impl.route_topk_qb(x, 2, None, BOUNDS, 4)[3]))
    # traced bounds are not checked: inverted or NaN bounds still count every row once
    for bad in ([1.0, -1.0], [np.nan, 1.0], [0.0, 0.0]):
        h = np.asarray(f(x, jnp.asarray(bad, jnp.float32)))
        assert (h.sum(axis=1) == 30).all()


# ---- shapes --------------------------------------------------------------------------------


def test_empty_and_nd(impl):
    h0 = jnp.ones((16, 5), jnp.int32)
    w, idx, cutoff, hist = impl.route_topk_qb(jnp.zeros((0, 16)), 3, None, BOUNDS, 5, h0)
    assert w.shape == (0, 3) and idx.shape == (0, 3) and cutoff.shape == (0,)
    np.testing.assert_array_equal(np.asarray(hist), np.asarray(h0))
    w, idx, cutoff, hist = impl.route_topk_qb(jnp.zeros((2, 0, 16)), 3, None, BOUNDS, 5)
    assert w.shape == (2, 0, 3) and cutoff.shape == (2, 0) and not np.asarray(hist).any()
    x = random_logits(11, (3, 5, 40), jnp.float16)
    out3 = impl.route_topk_qb(x, 6, random_bias(11, 40), BOUNDS, 9)
    out2 = impl.route_topk_qb(x.reshape(15, 40), 6, random_bias(11, 40), BOUNDS, 9)
    assert out3[0].shape == (3, 5, 6) and out3[2].shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(out3[1]).reshape(15, 6), np.asarray(out2[1]))
    if impl.name == "xla":  # XLA may compile the two shapes' sigmoids differently (an ulp)
        np.testing.assert_allclose(np.asarray(out3[0]).reshape(15, 6), np.asarray(out2[0]),
                                   rtol=1e-6)
        assert (np.asarray(out3[3]).sum(axis=1) == 15).all()
        return
    for a, b in zip(out3, out2):  # the kernels: the same bits whatever the leading dims
        np.testing.assert_array_equal(np.asarray(a).reshape(np.asarray(b).shape), np.asarray(b))


def test_int64_indices(impl):
    with jax.enable_x64(True):
        x = random_logits(12, (10, 20), jnp.float32)
        idx = impl.route_topk_qb(x, 4, None, BOUNDS, 3, index_dtype=jnp.int64)[1]
        assert idx.dtype == jnp.int64
        np.testing.assert_array_equal(np.asarray(idx),
                                      np.asarray(impl.route_topk_qb(x, 4, None, BOUNDS, 3)[1]))


def test_vmap(impl):
    """vmap: each batch member routed with its own histogram (the given one, batched or not,
    plus its own counts), gradients included."""
    x = random_logits(15, (3, 7, 16), jnp.float32)
    h0 = jnp.asarray(np.random.default_rng(4).integers(0, 5, (3, 16, 4)), jnp.int32)
    f = lambda x, h: impl.route_topk_qb(x, 2, None, BOUNDS, 4, h)
    out = jax.vmap(f)(x, h0)
    shared = jax.vmap(f, in_axes=(0, None))(x, h0[0])
    for b in range(3):
        one = f(x[b], h0[b])
        for a, o in zip(out, one):
            np.testing.assert_array_equal(np.asarray(a[b]), np.asarray(o))
        np.testing.assert_array_equal(np.asarray(shared[3][b]), np.asarray(f(x[b], h0[0])[3]))
    r = jnp.asarray(np.random.default_rng(5).standard_normal((3, 7, 2)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(jax.vmap(f)(x, h0)[0] * r))(x)
    g1 = jax.grad(lambda x: jnp.sum(f(x.reshape(21, 16), h0[0])[0] * r.reshape(21, 2)))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g1), rtol=1e-6, atol=1e-8)


# ---- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
def test_gradient(impl, k):
    x = random_logits(13, (6, 20), jnp.float32)
    bias = random_bias(13, 20)
    r = jnp.asarray(np.random.default_rng(1).standard_normal((6, k)), jnp.float32)
    loss = lambda x: jnp.sum(impl.route_topk_qb(x, k, bias, BOUNDS, 7, scaling_factor=1.5)[0] * r)
    ref = lambda x: jnp.sum(jr.reference.route_topk_qb(x, k, bias, BOUNDS, 7,
                                                       scaling_factor=1.5)[0] * r)
    g = np.asarray(jax.grad(loss)(x))
    assert np.count_nonzero(g) > 0
    np.testing.assert_allclose(g, np.asarray(jax.grad(ref)(x)), rtol=1e-5, atol=1e-7)
    check_grads(loss, (x,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    # the same gradient as the plain sigmoid router's
    plain = lambda x: jnp.sum(impl.route_topk(x, k, score_function="sigmoid", expert_bias=bias,
                                              scaling_factor=1.5)[0] * r)
    np.testing.assert_array_equal(g, np.asarray(jax.grad(plain)(x)))


def test_gradient_through_probs(impl):
    x = random_logits(14, (5, 16), jnp.float32)
    r = jnp.asarray(np.random.default_rng(2).standard_normal((5, 16)), jnp.float32)
    loss = lambda x: jnp.sum(impl.fused_topk_with_score_function_qb(x, 3, None, BOUNDS, 4)[0] * r)
    ref = lambda x: jnp.sum(jr.reference.fused_topk_with_score_function_qb(
        x, 3, None, BOUNDS, 4)[0] * r)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(x)), np.asarray(jax.grad(ref)(x)),
                               rtol=1e-5, atol=1e-7)


# ---- validation ----------------------------------------------------------------------------

X = jnp.zeros((4, 8), jnp.float32)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(score_function="softmax"), ValueError, "sigmoid"),
    (dict(score_function="sqrtsoftplus"), ValueError, "sigmoid"),
    (dict(num_groups=2, group_topk=1), ValueError, "num_groups"),
    (dict(topk=8), ValueError, r"topk \+ 1 <= E"),
    (dict(num_bins=0), ValueError, "num_bins"),
    (dict(num_bins=2.5), TypeError, "num_bins"),
    (dict(histogram=jnp.zeros((8, 4), jnp.float32)), TypeError, "histogram"),
    (dict(histogram=jnp.zeros((8, 5), jnp.int32)), ValueError, "histogram"),
    (dict(bin_bounds=jnp.zeros((3,))), ValueError, "bin_bounds"),
    (dict(bin_bounds=jnp.zeros((2,), jnp.int32)), TypeError, "bin_bounds"),
    (dict(bin_bounds=np.array([1.0, -1.0], np.float32)), ValueError, "lower < upper"),
    (dict(bin_bounds=np.array([0.0, np.inf], np.float32)), ValueError, "finite"),
    (dict(bin_bounds=np.array([np.nan, 1.0], np.float32)), ValueError, "finite"),
    (dict(expert_bias=jnp.zeros((7,))), ValueError, "expert_bias"),
    (dict(index_dtype=jnp.float32), TypeError, "index_dtype"),
])
def test_validation(impl, kwargs, error, match):
    args = dict(topk=3, expert_bias=None, bin_bounds=BOUNDS, num_bins=4)
    args.update(kwargs)
    positional = [args.pop(n) for n in ("topk", "expert_bias", "bin_bounds", "num_bins")]
    with pytest.raises(error, match=match):
        impl.route_topk_qb(X, *positional, **args)


def test_validation_fused(impl):
    with pytest.raises(ValueError, match="bitmap_u8"):
        impl.fused_topk_with_score_function_qb(X, 3, None, BOUNDS, 4,
                                               routing_map_format="bitmap_u8",
                                               topk_indices_dtype=jnp.int32)
    with pytest.raises(ValueError, match="use_pre_softmax"):
        impl.fused_topk_with_score_function_qb(X, 3, None, BOUNDS, 4, use_pre_softmax=True)


# ---- sharding ------------------------------------------------------------------------------

NDEV = jax.device_count()


@pytest.mark.skipif(NDEV < 4 or NDEV % 2, reason="needs an even number (>= 4) of devices")
@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_token_sharded_histogram_is_global(kind):
    """Under jit with token-sharded logits each device routes its rows and the histogram is the
    sum of all devices' counts: no all-gather of the logits, one all-reduce of the counts."""
    shape = (NDEV // 2, 2)
    axis_type = AxisType.Auto if kind == "auto" else AxisType.Explicit
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), ("x", "y"),
                             axis_types=(axis_type,) * 2)
    E, k, nb = 32, 4, 12
    x = random_logits(21, (4 * NDEV, 4, E), jnp.float32)
    bias = random_bias(21, E)
    h0 = jnp.asarray(np.random.default_rng(3).integers(0, 9, (E, nb)), jnp.int32)
    want = jr.route_topk_qb(x, k, bias, BOUNDS, nb, h0)
    xs = jax.device_put(x, NamedSharding(mesh, P("x", "y", None)))
    f = jax.jit(lambda x, h: jr.route_topk_qb(x, k, bias, BOUNDS, nb, h))
    got = f(xs, h0)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hlo = f.lower(xs, h0).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert re.search(rf"s32\[{E},{nb}\][^\n]*all-reduce", hlo), "the counts are summed"
    assert re.search(r"f32\[\d+,\d+,32\][^\n]*jax_router_qb_fwd|jax_router_qb_fwd", hlo)
    # the gradient under the same sharding equals the unsharded one
    loss = lambda x: jnp.sum(jr.route_topk_qb(x, k, bias, BOUNDS, nb)[0] ** 2)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(loss))(xs)),
                                  np.asarray(jax.grad(loss)(x)))


@pytest.mark.skipif(NDEV < 2, reason="needs several devices")
def test_shard_map_per_device():
    mesh = jax.make_mesh((NDEV,), ("d",), axis_types=(AxisType.Explicit,))
    E, k, nb = 16, 3, 5
    x = jax.device_put(random_logits(22, (2 * NDEV, E), jnp.float32),
                       NamedSharding(mesh, P("d", None)))
    per_device = jax.jit(jax.shard_map(
        lambda x: jr.route_topk_qb(x, k, None, BOUNDS, nb)[3][None], mesh=mesh,
        in_specs=P("d"), out_specs=P("d")))(x)
    assert per_device.shape == (NDEV, E, nb)
    assert (np.asarray(per_device).sum(axis=2) == 2).all()  # each device counted its 2 rows
    np.testing.assert_array_equal(np.asarray(per_device).sum(axis=0),
                                  np.asarray(jr.route_topk_qb(x, k, None, BOUNDS, nb)[3]))
