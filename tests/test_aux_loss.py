"""Aux-loss helpers (docs/semantics.md#aux-loss): the kernels against the pure-JAX reference (`kernel_impl`; the
pure-JAX implementation is that reference), properties every implementation has (`impl`),
gradients, validation and the global aux loss under token sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jax_router as jr
from jax_router import reference

from .util import FLOAT_DTYPES, random_logits

FNS = ("softmax", "sigmoid", "sqrtsoftplus")
# (leading dims, E, topk): odd and even E, topk from 1 to E, N-d leading dims.
SHAPES = [
    ((37,), 1, 1),
    ((4, 9), 7, 3),
    ((2, 3, 5), 33, 6),
    ((50,), 130, 8),
    ((16,), 160, 40),
    ((12,), 256, 20),   # CUDA: the register kernel's radix selection (k > 16)
    ((9,), 1024, 16),   # CUDA: the largest register kernel (32 experts per lane)
    ((5,), 1025, 3),    # CUDA: the general kernel (E > 1024)
    ((3,), 2048, 64),
]


def scores_and_map(logits, topk, fn, fmt="bytemap", impl=None):
    """The aux-score op; `impl` is an implementation of tests/impls.py, or "ffi" / "xla" /
    None (the public functions' implementation= argument)."""
    implementation = getattr(impl, "implementation", impl)
    return jr.fused_compute_score_for_moe_aux_loss(logits, topk, fn, fmt,
                                                   implementation=implementation)


def unpack_bitmap(bitmap, E):
    bits = np.unpackbits(np.asarray(bitmap), axis=-1, bitorder="little")
    return bits[..., :E].astype(bool), bits[..., E:]


def assert_map_matches(m, ref_m, ref_scores, topk, rtol=1e-5):
    """Maps equal row by row, except where the experts that differ sit at a numeric near-tie
    with the row's k-th largest reference score (never at an exact tie)."""
    m, ref_m = np.asarray(m), np.asarray(ref_m)
    assert m.shape == ref_m.shape and m.dtype == np.bool_
    E = m.shape[-1]
    m2, r2 = m.reshape(-1, E), ref_m.reshape(-1, E)
    assert (m2.sum(-1) == topk).all(), "every row marks exactly topk experts"
    z = np.asarray(ref_scores, np.float64).reshape(-1, E)
    bad = np.nonzero((m2 != r2).any(-1))[0]
    for r in bad:
        kth = np.sort(z[r])[::-1][topk - 1]
        diff = z[r][m2[r] != r2[r]]
        assert np.allclose(diff, kth, rtol=rtol, atol=1e-9) and (diff != kth).any(), (
            f"row {r}: map differs away from a near-tie ({diff} vs k-th score {kth})")
    assert bad.size <= max(1, m2.shape[0] // 100), f"{bad.size} rows differ"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("lead,E,topk", SHAPES)
def test_scores_match_reference(kernel_impl, lead, E, topk, fn, dtype):
    x = random_logits(E * 31 + topk, lead + (E,), dtype)
    m, s = jax.jit(scores_and_map, static_argnums=(1, 2, 3, 4))(x, topk, fn, "bytemap",
                                                                 kernel_impl)
    rm, rs = reference.fused_compute_score_for_moe_aux_loss(x, topk, fn)
    assert s.dtype == jnp.float32 and s.shape == x.shape
    assert m.dtype == jnp.bool_ and m.shape == x.shape
    np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=2e-5, atol=1e-9)
    assert_map_matches(m, rm, rs, topk)
    if dtype != jnp.float32:
        return
    # bitmap_u8 holds the same selection, LSB first, padding bits zero.
    bm, _ = scores_and_map(x, topk, fn, "bitmap_u8", kernel_impl)
    assert bm.dtype == jnp.uint8 and bm.shape == lead + ((E + 7) // 8,)
    bits, pad = unpack_bitmap(bm, E)
    np.testing.assert_array_equal(bits, np.asarray(m))
    assert not pad.any()
    if (np.asarray(m) == np.asarray(rm)).all():
        ref_bm = reference.fused_compute_score_for_moe_aux_loss(x, topk, fn, "bitmap_u8")[0]
        np.testing.assert_array_equal(np.asarray(bm), np.asarray(ref_bm))


@pytest.mark.parametrize("fn", FNS)
def test_normalisation_ignores_topk(impl, fn):
    x = random_logits(3, (8, 12))
    s1 = scores_and_map(x, 1, fn, impl=impl)[1]
    s5 = scores_and_map(x, 5, fn, impl=impl)[1]
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s5))
    np.testing.assert_allclose(np.asarray(s1).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("fn", FNS)
def test_exact_ties_go_to_lower_id(kernel_impl, fn):
    # Few distinct, well-separated values: many exact ties, no near-ties.
    for E, k in ((13, 1), (13, 4), (13, 9), (40, 20), (1100, 20)):
        x = jax.random.randint(jax.random.key(5), (200, E), 0, 3).astype(jnp.float32)
        m, _ = scores_and_map(x, k, fn, impl=kernel_impl)
        rm, _ = reference.fused_compute_score_for_moe_aux_loss(x, k, fn)
        np.testing.assert_array_equal(np.asarray(m), np.asarray(rm))
    # Explicitly: among equal scores the lower ids are marked.
    row = jnp.asarray([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]], jnp.float32)
    mm, _ = scores_and_map(row, 2, fn, impl=kernel_impl)
    np.testing.assert_array_equal(np.asarray(mm)[0], [0, 1, 0, 1, 0, 0])


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 2)])
def test_empty_batches(kernel_impl, lead, fn):
    x = jnp.zeros(lead + (9,), jnp.bfloat16)
    m, s = scores_and_map(x, 3, fn, impl=kernel_impl)
    assert m.shape == x.shape and s.shape == x.shape and s.dtype == jnp.float32
    bm, _ = scores_and_map(x, 3, fn, "bitmap_u8", kernel_impl)
    assert bm.shape == lead + (2,)
    g = jax.grad(lambda x: scores_and_map(x, 3, fn, impl=kernel_impl)[1].sum())(x)
    assert g.shape == x.shape and g.dtype == x.dtype


def _weighted(fn, topk, impl, w):
    def f(x):
        m, s = scores_and_map(x, topk, fn, impl=impl)
        return jnp.sum(s * w)
    return f


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("lead,E,topk", [((6,), 7, 2), ((2, 3), 16, 4), ((5,), 1, 1)])
def test_grad_check(kernel_impl, lead, E, topk, fn):
    x = random_logits(11, lead + (E,), scale=1.0)
    f = lambda x: scores_and_map(x, topk, fn, impl=kernel_impl)[1]
    check_grads(f, (x,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("lead,E,topk,dtype", [
    ((3, 7), 9, 3, jnp.float32), ((10,), 130, 1, jnp.float32), ((4, 5), 33, 4, jnp.bfloat16),
    ((20,), 16, 2, jnp.float16), ((6,), 256, 8, jnp.bfloat16), ((5,), 1024, 8, jnp.float32),
    ((3,), 1100, 8, jnp.float32)], ids=str)
def test_grad_matches_reference(kernel_impl, lead, E, topk, dtype, fn):
    x = random_logits(E + topk, lead + (E,), dtype)
    w = jax.random.normal(jax.random.key(7), lead + (E,))
    g = jax.jit(jax.grad(_weighted(fn, topk, kernel_impl, w)))(x)
    rg = jax.grad(_weighted(fn, topk, "xla", w))(x)
    assert g.dtype == x.dtype and g.shape == x.shape
    tol = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}[jnp.dtype(dtype).name]
    g32, rg32 = np.asarray(g, np.float32), np.asarray(rg, np.float32)
    np.testing.assert_allclose(g32, rg32, rtol=tol, atol=tol * np.abs(rg32).max() + 1e-12)


def test_vmap_and_jit(kernel_impl):
    x = random_logits(2, (3, 4, 10))
    f = lambda x: scores_and_map(x, 3, "sigmoid", impl=kernel_impl)
    m, s = jax.vmap(f)(x)
    rm, rs = f(x)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(rm))
    np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=1e-6)
    assert "scan" not in str(jax.make_jaxpr(jax.vmap(f))(x))


def test_scores_validation():
    x = jnp.ones((4, 8))
    with pytest.raises(TypeError, match="logits"):
        jr.fused_compute_score_for_moe_aux_loss(x.astype(jnp.int32), 2, "softmax")
    with pytest.raises(ValueError, match="logits"):
        jr.fused_compute_score_for_moe_aux_loss(jnp.float32(1.0), 1, "softmax")
    for k in (0, 9, -1):
        with pytest.raises(ValueError, match="topk"):
            jr.fused_compute_score_for_moe_aux_loss(x, k, "softmax")
    with pytest.raises(TypeError, match="topk"):
        jr.fused_compute_score_for_moe_aux_loss(x, 2.0, "softmax")
    with pytest.raises(ValueError, match="score_function"):
        jr.fused_compute_score_for_moe_aux_loss(x, 2, "relu")
    with pytest.raises(ValueError, match="routing_map_format"):
        jr.fused_compute_score_for_moe_aux_loss(x, 2, "softmax", "dense")
    with pytest.raises(ValueError, match="implementation"):
        jr.fused_compute_score_for_moe_aux_loss(x, 2, "softmax", implementation="cuda")
    # Enums work as score_function / routing_map_format.
    m, _ = jr.fused_compute_score_for_moe_aux_loss(x, 2, jr.ScoreFunction.SIGMOID,
                                                   jr.RoutingMapFormat.BITMAP_U8)
    assert m.dtype == jnp.uint8


# ---- fused_moe_aux_loss ------------------------------------------------------------------

def numpy_aux_loss(probs, tpe, T, E, k, coeff):
    p = np.asarray(probs, np.float64)
    p = p.reshape(-1, p.shape[-1])
    return E * coeff / (k * T * T) * float((p.sum(0) * np.asarray(tpe, np.float64)).sum())


# (probs dtype, tokens_per_expert dtype) pairs: every dtype of each appears.
DTYPE_PAIRS = [(jnp.float32, jnp.int32), (jnp.bfloat16, jnp.float32),
               (jnp.float16, jnp.bfloat16), (jnp.float32, jnp.int16)]


@pytest.mark.parametrize("dtype,tpe_dtype", DTYPE_PAIRS,
                         ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape,E,k", [((64, 8), 8, 2), ((3, 5, 21), 7, 3), ((33, 4 * 13), 13, 4)])
def test_aux_loss_value(shape, E, k, dtype, tpe_dtype):
    probs = jax.nn.softmax(random_logits(1, shape), axis=-1).astype(dtype)
    T = int(np.prod(shape[:-1]))
    tpe = jax.random.randint(jax.random.key(2), (shape[-1],), 1, 50).astype(tpe_dtype)
    loss = jax.jit(jr.fused_moe_aux_loss, static_argnums=(2, 3, 4, 5))(probs, tpe, T, E, k, 0.01)
    ref = reference.fused_moe_aux_loss(probs, tpe, T, E, k, 0.01)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), numpy_aux_loss(probs, tpe, T, E, k, 0.01), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    for impl in ("ffi", "xla"):
        np.testing.assert_allclose(
            float(jr.fused_moe_aux_loss(probs, tpe, T, E, k, 0.01, implementation=impl)),
            float(loss), rtol=1e-6)


def test_aux_loss_int64_tokens():
    with jax.enable_x64(True):
        probs = jax.nn.softmax(random_logits(4, (10, 6)), axis=-1)
        tpe = jnp.arange(1, 7, dtype=jnp.int64)
        loss = jr.fused_moe_aux_loss(probs, tpe, 10, 6, 2, 1e-2)
        assert loss.dtype == jnp.float32
        np.testing.assert_allclose(float(loss), numpy_aux_loss(probs, tpe, 10, 6, 2, 1e-2),
                                   rtol=1e-5)


def test_aux_loss_traced_scalars():
    probs = jax.nn.softmax(random_logits(6, (12, 8)), axis=-1)
    tpe = jnp.arange(8, dtype=jnp.int32) + 3
    f = jax.jit(lambda p, t, T, c: jr.fused_moe_aux_loss(p, t, T, 8, 2, c))
    loss = f(probs, tpe, jnp.int32(12), jnp.float32(0.1))
    np.testing.assert_allclose(float(loss), numpy_aux_loss(probs, tpe, 12, 8, 2, 0.1), rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_aux_loss_grad(dtype):
    shape, E, k, T, coeff = (5, 6, 16), 8, 2, 30, 0.3
    probs = jax.nn.softmax(random_logits(8, shape), axis=-1).astype(dtype)
    tpe = jax.random.uniform(jax.random.key(9), (16,), minval=1, maxval=9)
    g_p, g_t = jax.grad(jr.fused_moe_aux_loss, argnums=(0, 1))(probs, tpe, T, E, k, coeff)
    assert g_p.dtype == dtype and g_p.shape == shape
    C = E * coeff / (k * T * T)
    want = np.broadcast_to(C * np.asarray(tpe), shape)
    np.testing.assert_allclose(np.asarray(g_p, np.float32), want,
                               rtol={"float32": 1e-6, "bfloat16": 1e-2, "float16": 1e-3}[
                                   jnp.dtype(dtype).name])
    np.testing.assert_array_equal(np.asarray(g_t), 0.0)  # tokens_per_expert gets no gradient
    if dtype == jnp.float32:
        check_grads(lambda p: jr.fused_moe_aux_loss(p, tpe, T, E, k, coeff), (probs,), order=1,
                    modes=("rev",))


def test_aux_loss_empty_rows():
    probs = jnp.zeros((0, 8), jnp.bfloat16)
    loss = jr.fused_moe_aux_loss(probs, jnp.ones((8,), jnp.int32), 4, 8, 2, 1.0)
    assert float(loss) == 0.0 and loss.dtype == jnp.float32


def test_aux_loss_validation():
    p = jnp.ones((4, 16))
    tpe = jnp.ones((16,), jnp.int32)
    ok = dict(total_num_tokens=4, num_experts=8, topk=2, coeff=0.1)

    def call(probs=p, tokens=tpe, **kw):
        return jr.fused_moe_aux_loss(probs, tokens, **{**ok, **kw})

    call()
    with pytest.raises(ValueError, match="num_experts"):
        call(num_experts=6)  # cols=16 not a multiple of 6
    with pytest.raises(ValueError, match="tokens_per_expert"):
        call(tokens=jnp.ones((8,), jnp.int32))
    with pytest.raises(ValueError, match="tokens_per_expert"):
        call(tokens=jnp.ones((2, 16), jnp.int32))
    for bad in (jnp.bool_, jnp.uint8):
        with pytest.raises(TypeError, match="tokens_per_expert"):
            call(tokens=tpe.astype(bad))
    with pytest.raises(TypeError, match="tokens_per_expert"):
        call(tokens="not an array")  # (a list of numbers is one, by jnp.asarray's rules)
    with pytest.raises(TypeError, match="probs"):
        call(probs=p.astype(jnp.int32))
    with pytest.raises(ValueError, match="probs"):
        call(probs=jnp.float32(1.0), tokens=jnp.ones((1,), jnp.int32), num_experts=1, topk=1)
    for k in (0, -1, 9):
        with pytest.raises(ValueError, match="topk"):
            call(topk=k)
    with pytest.raises(TypeError, match="topk"):
        call(topk=2.0)
    for T in (0, -5):
        with pytest.raises(ValueError, match="total_num_tokens"):
            call(total_num_tokens=T)
    with pytest.raises(TypeError, match="total_num_tokens"):
        call(total_num_tokens=4.0)
    with pytest.raises(ValueError, match="total_num_tokens"):
        call(total_num_tokens=jnp.ones((2,), jnp.int32))
    for E in (0, -8):
        with pytest.raises(ValueError, match="num_experts"):
            call(num_experts=E)
    with pytest.raises(TypeError, match="num_experts"):
        call(num_experts=8.0)
    with pytest.raises(ValueError, match="coeff"):
        call(coeff=float("nan"))
    with pytest.raises(TypeError, match="coeff"):
        call(coeff="0.1")
    with pytest.raises(ValueError, match="implementation"):
        call(implementation="triton")


# ---- sharding ----------------------------------------------------------------------------

def _mesh():
    """All local devices on one axis: the 8 host devices of tests/conftest.py, or the GPUs."""
    devs = jax.devices()
    if len(devs) < 2 or 8 % len(devs):
        pytest.skip("needs 2, 4 or 8 devices (tests/conftest.py sets 8 host devices)")
    return Mesh(np.array(devs), ("x",))


@pytest.mark.parametrize("shape,E", [((64, 16), 16), ((8, 8, 24), 8)])
def test_aux_loss_global_under_token_sharding(shape, E):
    mesh = _mesh()
    probs = jax.nn.softmax(random_logits(12, shape), axis=-1)
    T = int(np.prod(shape[:-1]))
    tpe = jax.random.randint(jax.random.key(13), (shape[-1],), 1, 40).astype(jnp.int32)
    f = lambda p, t: jr.fused_moe_aux_loss(p, t, T, E, 2, 0.05)
    single = f(probs, tpe)
    spec = P("x", *([None] * (len(shape) - 1)))
    ps = jax.device_put(probs, NamedSharding(mesh, spec))
    ts = jax.device_put(tpe, NamedSharding(mesh, P()))
    loss = jax.jit(f)(ps, ts)
    np.testing.assert_allclose(float(loss), float(single), rtol=1e-6)
    # A per-shard loss would be about 1/ndev of the global one.
    shard0 = f(probs[: shape[0] // mesh.size], tpe)
    assert not np.isclose(float(loss), float(shard0), rtol=0.1)
    g = jax.jit(jax.grad(f))(ps, ts)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(f)(probs, tpe)), rtol=1e-6)


def test_aux_loss_shard_map_axis_name():
    mesh = _mesh()
    probs = jax.nn.softmax(random_logits(14, (32, 8)), axis=-1)
    tpe = jnp.arange(8, dtype=jnp.int32) + 1
    f = lambda p, t, ax: jr.fused_moe_aux_loss(p, t, 32, 8, 2, 0.1, axis_name=ax)
    sm = jax.jit(jax.shard_map(lambda p, t: f(p, t, "x"), mesh=mesh, in_specs=(P("x"), P()),
                               out_specs=P()))
    np.testing.assert_allclose(float(sm(probs, tpe)), float(f(probs, tpe, None)), rtol=1e-6)


ROW_MOVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("fn,fmt,shape", [("softmax", "bytemap", (64, 12)),
                                          ("sigmoid", "bitmap_u8", (16, 4, 12)),
                                          ("sqrtsoftplus", "bytemap", (8, 2, 4, 12))])
def test_scores_under_token_sharding(kind, fn, fmt, shape):
    """The aux-score forward and backward run on each device's own rows: same values as one
    device, no collective in the compiled programs, outputs keep the token sharding."""
    from jax.sharding import AxisType

    devs = _mesh().devices
    axis_type = AxisType.Auto if kind == "auto" else AxisType.Explicit
    mesh = Mesh(devs, ("x",), axis_types=(axis_type,))
    x = random_logits(15, shape, jnp.bfloat16)
    w = jnp.cos(jnp.arange(12, dtype=jnp.float32))
    f = lambda x: scores_and_map(x, 3, fn, fmt, impl="ffi")
    g = jax.grad(lambda x: jnp.sum(f(x)[1] * w))
    want, want_g = jax.jit(f)(x), jax.jit(g)(x)
    spec = P("x", *([None] * (len(shape) - 1)))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        fc, gc = jax.jit(f).lower(xs).compile(), jax.jit(g).lower(xs).compile()
        (m, s), gx = fc(xs), gc(xs)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(want_g))
    assert np.abs(np.asarray(gx, np.float32)).max() > 0
    local = int(np.prod(shape[:-1])) // mesh.size
    for hlo, targets in ((fc.as_text(), {"jax_router_aux_scores_fwd"}),
                         # the backward needs only the logits: XLA drops the forward call
                         (gc.as_text(), {"jax_router_aux_scores_bwd"})):
        assert not [c for c in ROW_MOVES if c in hlo], hlo
        calls = [l for l in hlo.splitlines() if "custom_call_target=\"jax_router_aux" in l]
        assert {l.split('custom_call_target="')[1].split('"')[0] for l in calls} == targets
        for l in calls:  # the first operand is this device's [rows, (1,) X] block
            dims = l.split("operand_layout_constraints={")[1].split("[")[1].split("]")[0]
            assert int(np.prod([int(d) for d in dims.split(",")][:-1])) == local, l
    for out in (m, s, gx):
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, spec), out.ndim), out.sharding
    # the loss on top is the global one (XLA all-reduces the column sums)
    loss = jax.jit(lambda x: jr.fused_moe_aux_loss(
        f(x)[1], jnp.arange(12, dtype=jnp.int32), int(np.prod(shape[:-1])), 12, 3, 0.01))
    with jax.set_mesh(mesh):
        got_loss = loss(xs)
    np.testing.assert_allclose(float(got_loss), float(loss(x)), rtol=1e-6)


def test_scores_expert_sharded_logits_are_gathered():
    mesh = _mesh()
    x = random_logits(16, (8, 16), jnp.float32)
    f = jax.jit(lambda x: scores_and_map(x, 3, "sigmoid", impl="ffi"))
    want = f(x)
    with jax.set_mesh(mesh):
        got = f(jax.device_put(x, NamedSharding(mesh, P(None, "x"))))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_round_trip():
    x = random_logits(16, (6, 10))
    f = jax.jit(lambda x: scores_and_map(x, 3, "sqrtsoftplus", impl="ffi"))
    checks = [jax.export.DisabledSafetyCheck.custom_call(t)
              for t in ("jax_router_aux_scores_fwd", "jax_router_aux_scores_bwd")]
    exp = jax.export.export(f, platforms=("cpu", "cuda"), disabled_checks=checks)(x)
    back = jax.export.deserialize(exp.serialize())
    m, s = back.call(x)
    rm, rs = f(x)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(rm))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))


@pytest.mark.parametrize("fn", FNS)
def test_non_finite_logits(impl, fn):
    # NaN / +-inf in some rows: every row still marks exactly topk distinct experts, the same
    # ones as the reference (NaN scores rank last, ties to the lower id).
    x = np.array(random_logits(17, (6, 12)))
    x[0, 3] = np.nan
    x[1, 5] = np.inf
    x[2, 7] = -np.inf
    x[3, [1, 8]] = np.inf
    x[4, :] = -np.inf
    x[5, 2] = np.nan
    x[5, 9] = np.inf
    x = jnp.asarray(x)
    for k in (1, 4):
        m, s = scores_and_map(x, k, fn, impl=impl)
        rm, rs = reference.fused_compute_score_for_moe_aux_loss(x, k, fn)
        np.testing.assert_array_equal(np.asarray(m), np.asarray(rm))
        np.testing.assert_array_equal(np.isnan(np.asarray(s)), np.isnan(np.asarray(rs)))
        np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=2e-5, atol=1e-9)
