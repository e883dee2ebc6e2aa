"""docs/semantics.md#forward-order robustness: NaN / +inf / -inf in logits and expert_bias never give an out-of-range
or repeated index, in any output mode or index dtype, and the index order equals the
reference's exactly (NaN below -inf); every output element is written (no stale memory, no
leaked buffer contents); bitmap padding bits are zero.

Each check runs on the kernels (`kernel_impl`), where stale memory and buffers are a question
and the pure-JAX implementation would be compared with itself; the rules that every
implementation must keep (NaN order, finite gradients, int64, N-d batches) run on each (`impl`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr
from jax_router import reference

from .util import RTOL

NAN, INF = np.float32(np.nan), np.float32(np.inf)
E = 16  # 4 groups of 4 when groups are on


def special_rows(num_experts, seed=0):
    """Rows built from NaN, +-inf, +-0, huge and ordinary values (float32 [R, E])."""
    rng = np.random.default_rng(seed)
    n = num_experts

    def finite():
        return (2.0 * rng.standard_normal(n)).astype(np.float32)

    rows = [
        np.full(n, NAN),                                   # all NaN
        np.full(n, -INF),                                  # all -inf
        np.full(n, INF),                                   # all +inf
        np.where(np.arange(n) % 2 == 0, NAN, -INF),        # NaN / -inf alternating
        np.where(np.arange(n) % 3 == 0, INF, -INF),        # +inf / -inf only
        np.where(np.arange(n) == n - 1, 1.0, NAN),         # one number among NaNs
        np.where(np.arange(n) == 0, NAN, -INF),            # NaN first, -inf elsewhere
        np.where(np.arange(n) % 2 == 0, 0.0, -0.0),        # +0 / -0
        np.where(np.arange(n) % 4 == 1, 3e38, -3e38),      # group sums overflow
        finite(),                                          # ordinary row
    ]
    # random mixtures of specials and numbers
    for _ in range(6):
        x = finite()
        pick = rng.integers(0, 5, n)
        x = np.where(pick == 1, NAN, x)
        x = np.where(pick == 2, INF, x)
        x = np.where(pick == 3, -INF, x)
        rows.append(x)
    return np.stack(rows).astype(np.float32)


def special_bias(num_experts, seed=1):
    rng = np.random.default_rng(seed)
    b = (0.3 * rng.standard_normal(num_experts)).astype(np.float32)
    b[1::5] = NAN
    b[2::7] = INF
    b[3::6] = -INF
    return b


# (name, kwargs without the bias, bias: None | "finite" | "special")
CONFIGS = [
    ("softmax", dict(), None),
    ("pre_softmax", dict(use_pre_softmax=True), None),
    ("sigmoid", dict(score_function="sigmoid", scaling_factor=2.0), None),
    ("sigmoid_special_bias", dict(score_function="sigmoid"), "special"),
    ("sqrtsoftplus_bias", dict(score_function="sqrtsoftplus"), "finite"),
    ("sqrtsoftplus_special_bias", dict(score_function="sqrtsoftplus", scaling_factor=0.5),
     "special"),
]
INDEX_DTYPES = (jnp.int16, jnp.int32)


def make_bias(kind, num_experts):
    if kind is None:
        return None
    if kind == "special":
        return jnp.asarray(special_bias(num_experts))
    return jnp.asarray((0.3 * np.random.default_rng(5).standard_normal(num_experts))
                       .astype(np.float32))


def all_modes(impl, x, bias, topk, kw, buffers, index_dtypes=INDEX_DTYPES, with_ref=True):
    """Every output mode through `impl` (and the reference), in one program."""
    kw = dict(kw, expert_bias=bias)
    out = {"ref": reference.route_topk(x, topk, **kw)} if with_ref else {}
    out.update({
        "bytemap": impl.fused_topk_with_score_function(x, topk, **kw),
        "bitmap": impl.fused_topk_with_score_function(x, topk, routing_map_format="bitmap_u8",
                                                      **kw),
    })
    for dt in index_dtypes:
        name = jnp.dtype(dt).name
        out["compact_" + name] = impl.route_topk(x, topk, index_dtype=dt, **kw)
        out["dense_" + name] = impl.fused_topk_with_score_function(
            x, topk, topk_indices_dtype=dt, **kw)
        out["buffer_" + name] = impl.fused_topk_with_score_function(
            x, topk, topk_indices=buffers[name], **kw)
    return out


def poison_buffers(lead, topk, index_dtypes=INDEX_DTYPES, value=-7):
    return {jnp.dtype(dt).name: jnp.full(lead + (topk,), value, dt) for dt in index_dtypes}


def run_all_modes(impl, x, bias, topk, kw, index_dtypes=INDEX_DTYPES, eager_ref=False):
    """All modes, with poisoned and donated topk_indices buffers.

    eager_ref: run the reference op by op instead of inside the program; its compiled
    primitives are then cached across the many option sets of one shape, which is much cheaper
    than compiling it once per option set."""
    bufs = poison_buffers(x.shape[:-1], topk, index_dtypes)
    # (the pure-JAX path never reads the buffers, so XLA drops them: nothing to donate there)
    fn = jax.jit(lambda x, b, bufs: all_modes(impl, x, b, topk, kw, bufs, index_dtypes,
                                              with_ref=not eager_ref),
                 donate_argnums=(2,) if impl.kernels else ())
    out = jax.tree.map(np.asarray, fn(x, bias, bufs))
    if eager_ref:
        out["ref"] = jax.tree.map(np.asarray,
                                  reference.route_topk(x, topk, expert_bias=bias, **kw))
    return out, bufs


def assert_valid_indices(idx, num_experts, topk):
    idx = np.asarray(idx).astype(np.int64).reshape(-1, topk)
    assert ((idx >= 0) & (idx < num_experts)).all(), f"index out of range:\n{idx}"
    for r, row in enumerate(idx):
        assert len(set(row.tolist())) == topk, f"repeated index in row {r}: {row}"


def assert_floats_equal(a, b, dtype, what):
    """Equal to the reference to the dtype's rounding, NaN where the reference has NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=what + " (NaN positions)")
    rtol = RTOL[jnp.dtype(dtype)]
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-3, err_msg=what)


def dense_from_compact(w, idx, num_experts, dtype):
    """The reference's [*lead, E] probs and map from its compact output (as reference.py's
    fused function builds them: scatter of the weights, cast to the logits dtype)."""
    lead, k = idx.shape[:-1], idx.shape[-1]
    rows = np.arange(int(np.prod(lead))).repeat(k)
    probs = np.zeros((rows.size // max(k, 1), num_experts), np.float32)
    bmap = np.zeros(probs.shape, bool)
    probs[rows, idx.reshape(-1)] = w.reshape(-1)
    bmap[rows, idx.reshape(-1)] = True
    probs = np.asarray(jnp.asarray(probs).astype(dtype))
    return probs.reshape(lead + (num_experts,)), bmap.reshape(lead + (num_experts,))


def check_modes(out, x, topk, index_dtypes=INDEX_DTYPES, compare_floats=True):
    num_experts = x.shape[-1]
    lead = x.shape[:-1]
    ref_w, ref_idx = out["ref"]
    ref_probs, ref_map = dense_from_compact(ref_w, ref_idx.astype(np.int64), num_experts,
                                            x.dtype)
    ref_bits = np.packbits(ref_map, axis=-1, bitorder="little")
    assert_valid_indices(ref_idx, num_experts, topk)
    for dt in index_dtypes:
        name = jnp.dtype(dt).name
        for mode in ("compact_", "dense_", "buffer_"):
            first, idx = out[mode + name]
            assert idx.dtype == dt and idx.shape == lead + (topk,)
            assert_valid_indices(idx, num_experts, topk)
            # Same order as the reference, exactly, NaN and infinities included.
            np.testing.assert_array_equal(idx, ref_idx, err_msg=mode + name)
            if compare_floats:
                if mode == "compact_":
                    assert_floats_equal(first, ref_w, jnp.float32, mode + name + " weights")
                else:
                    assert_floats_equal(first, ref_probs, x.dtype, mode + name + " probs")
    probs, bmap = out["bytemap"]
    assert bmap.dtype == np.bool_
    assert (bmap.reshape(-1, num_experts).sum(-1) == topk).all()
    np.testing.assert_array_equal(bmap, ref_map)
    probs_b, bits = out["bitmap"]
    unpacked = np.unpackbits(bits, axis=-1, bitorder="little")
    assert (unpacked[..., num_experts:] == 0).all(), "bitmap padding bits are set"
    np.testing.assert_array_equal(unpacked[..., :num_experts].astype(bool), bmap)
    np.testing.assert_array_equal(bits, ref_bits)
    if compare_floats:
        assert_floats_equal(probs, ref_probs, x.dtype, "probs (bytemap)")
        assert_floats_equal(probs_b, ref_probs, x.dtype, "probs (bitmap)")
        # probs are exactly zero off the selection, whatever the inputs
        assert (np.asarray(probs, np.float32)[~bmap] == 0).all()


# ---- NaN / inf in logits and bias --------------------------------------------------------


@pytest.mark.parametrize("topk,groups", [(1, True), (4, False), (4, True), (E, False), (E, True)],
                         ids=["k1-groups", "k4", "k4-groups", "kE", "kE-groups"])
@pytest.mark.parametrize("name,kw,bias_kind", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_special_values(kernel_impl, name, kw, bias_kind, topk, groups):
    kw = dict(kw)
    if groups:
        # 4 groups of 4; keep 1 (topk 1), 2 (topk 4: two per group) or all (topk == E)
        kw["num_groups"], kw["group_topk"] = 4, {1: 1, 4: 2, E: 4}[topk]
    dtype = jnp.bfloat16 if (topk + len(name)) % 3 == 0 else jnp.float32
    x = jnp.asarray(special_rows(E, seed=topk).astype(dtype))
    out, bufs = run_all_modes(kernel_impl, x, make_bias(bias_kind, E), topk, kw, eager_ref=True)
    check_modes(out, x, topk)
    for b in bufs.values():
        assert b.is_deleted()


@pytest.mark.parametrize("num_experts", [1, 3, 9, 13])
def test_special_values_odd_expert_counts(kernel_impl, num_experts):
    """Small / odd E: every topk up to E, every score function, specials in rows and bias."""
    x = jnp.asarray(special_rows(num_experts, seed=num_experts))
    for i, topk in enumerate(sorted({1, (num_experts + 1) // 2, num_experts})):
        name, kw, bias_kind = CONFIGS[(num_experts + 2 * i) % len(CONFIGS)]
        out, _ = run_all_modes(kernel_impl, x, make_bias(bias_kind, num_experts), topk, kw)
        check_modes(out, x, topk)


def test_special_values_int64(impl):
    with jax.enable_x64(True):
        x = jnp.asarray(special_rows(E, seed=3))
        kw = dict(score_function="sigmoid", num_groups=4, group_topk=2)
        out, _ = run_all_modes(impl, x, make_bias("special", E), 4, kw,
                               index_dtypes=(jnp.int64,))
        check_modes(out, x, 4, index_dtypes=(jnp.int64,))


@pytest.mark.parametrize("lead", [(2, 8), (4, 2, 2)], ids=str)
def test_special_values_leading_dims(impl, lead):
    """Specials in N-d batches: rows keep their own result whatever the layout."""
    rows = special_rows(E, seed=11)
    x = jnp.asarray(rows.reshape(lead + (E,)))
    kw = dict(score_function="sqrtsoftplus", num_groups=2, group_topk=2)
    out, _ = run_all_modes(impl, x, make_bias("special", E), 6, kw)
    check_modes(out, x, 6)


def test_nan_ranks_below_minus_inf(impl):
    x = jnp.asarray(np.array([[NAN, -INF, NAN, -INF, 0.0],
                              [NAN, NAN, NAN, -INF, NAN]], np.float32))
    for mode_out in (impl.route_topk(x, 5)[1],
                     impl.fused_topk_with_score_function(x, 5, topk_indices_dtype=jnp.int16)[1]):
        np.testing.assert_array_equal(np.asarray(mode_out), [[4, 1, 3, 0, 2], [3, 0, 1, 2, 4]])


def test_bias_nan_excludes_expert_last(impl):
    """A NaN bias makes that expert's selection score NaN: chosen only after every number."""
    x = jnp.zeros((3, 6), jnp.float32)
    bias = jnp.asarray(np.array([NAN, 0.1, -INF, 0.2, NAN, INF], np.float32))
    for fn in ("sigmoid", "sqrtsoftplus"):
        idx = np.asarray(impl.route_topk(x, 6, score_function=fn, expert_bias=bias)[1])
        np.testing.assert_array_equal(idx, np.tile([5, 3, 1, 2, 0, 4], (3, 1)))
        ref = np.asarray(reference.route_topk(x, 6, score_function=fn, expert_bias=bias)[1])
        np.testing.assert_array_equal(idx, ref)


def test_grad_with_special_rows_is_rowwise(kernel_impl):
    """The backward on a batch with NaN / inf rows leaves the ordinary rows' gradients alone."""
    rows = special_rows(E, seed=21)
    finite_rows = np.isfinite(rows).all(-1)
    assert finite_rows.sum() >= 1
    x = jnp.asarray(rows)
    for kw in (dict(), dict(use_pre_softmax=True), dict(score_function="sigmoid"),
               dict(score_function="sqrtsoftplus", num_groups=4, group_topk=2)):
        def loss(x, fn):
            w = fn(x, 4, **kw)[0]
            return jnp.sum(jnp.where(jnp.isfinite(w), w, 0.0) * jnp.arange(1.0, w.shape[-1] + 1))

        g = np.asarray(jax.jit(jax.grad(lambda x: loss(x, kernel_impl.route_topk)))(x))
        g_clean = np.asarray(jax.grad(lambda x: loss(x, kernel_impl.route_topk))(x[finite_rows]))
        assert g.shape == rows.shape
        np.testing.assert_array_equal(g[finite_rows], g_clean)
        assert np.isfinite(g_clean).all()


# ---- every output element is written ----------------------------------------------------


@pytest.mark.parametrize("name,kw,bias_kind", CONFIGS[:5:2], ids=[c[0] for c in CONFIGS[:5:2]])
def test_outputs_fully_written_across_calls(kernel_impl, name, kw, bias_kind):
    """Each mode run repeatedly, in one process, on different inputs (and with poisoned
    buffers): any element a kernel left unwritten would carry a previous call's value."""
    num_experts, topk, lead = 20, 3, (7,)
    bias = make_bias(bias_kind, num_experts)
    kw = dict(kw)
    fn = jax.jit(lambda x, b, bufs: all_modes(kernel_impl, x, b, topk, kw, bufs),
                 donate_argnums=(2,))
    for seed in range(4):
        x = (4.0 * np.random.default_rng(100 + seed).standard_normal(lead + (num_experts,)))
        if seed % 2:
            # odd calls: a very different input, so stale values would stand out
            x = -x[:, ::-1].copy()
        x = jnp.asarray(x.astype(np.float32))
        value = [-7, 32767, 0, 1][seed]  # 0 and 1 look like valid expert ids
        out = jax.tree.map(np.asarray, fn(x, bias, poison_buffers(lead, topk, value=value)))
        check_modes(out, x, topk)


def test_outputs_fully_written_after_dead_buffers(kernel_impl):
    """Inside one program a routing call follows others whose outputs are dead, so XLA may hand
    their memory (holding other routing decisions) to the later call's outputs."""
    num_experts, topk = 21, 5
    xs = [jnp.asarray((3.0 * np.random.default_rng(s).standard_normal((9, num_experts)))
                      .astype(np.float32)) for s in range(3)]

    def prog(a, b, c):
        acc = jnp.float32(0)
        for x in (a, b):
            for fmt in ("bytemap", "bitmap_u8"):
                p, m = kernel_impl.fused_topk_with_score_function(x, topk,
                                                                  routing_map_format=fmt)
                acc = acc + p.sum() + m.astype(jnp.float32).sum()
            w, i = kernel_impl.route_topk(x, topk)
            acc = acc + w.sum() + i.sum()
        c = c + 0 * acc  # the last calls run after every earlier output is dead
        fused = kernel_impl.fused_topk_with_score_function
        return (fused(c, topk), fused(c, topk, routing_map_format="bitmap_u8"),
                fused(c, topk, topk_indices_dtype=jnp.int16), kernel_impl.route_topk(c, topk))

    got = jax.tree.map(np.asarray, jax.jit(prog)(*xs))
    c = xs[2]
    want = jax.tree.map(np.asarray, (
        reference.fused_topk_with_score_function(c, topk),
        reference.fused_topk_with_score_function(c, topk, routing_map_format="bitmap_u8"),
        reference.fused_topk_with_score_function(c, topk, topk_indices_dtype=jnp.int16),
        reference.route_topk(c, topk)))
    for (g0, g1), (w0, w1) in zip(got, want):
        np.testing.assert_array_equal(g1, w1)
        assert_floats_equal(g0, w0, jnp.float32, "probs / weights")


@pytest.mark.parametrize("num_experts", [1, 5, 8, 9, 15, 17, 33])
def test_bitmap_padding_bits_zero(kernel_impl, num_experts):
    nbytes = (num_experts + 7) // 8
    rng = np.random.default_rng(num_experts)
    x = jnp.asarray((3 * rng.standard_normal((11, num_experts))).astype(np.float32))
    for topk in sorted({1, num_experts}):
        for kw in (dict(), dict(score_function="sigmoid", expert_bias=jnp.asarray(
                special_bias(num_experts)))):
            probs, bits = kernel_impl.fused_topk_with_score_function(
                x, topk, routing_map_format="bitmap_u8", **kw)
            bits = np.asarray(bits)
            assert bits.shape == (11, nbytes) and bits.dtype == np.uint8
            unpacked = np.unpackbits(bits, axis=-1, bitorder="little")
            assert (unpacked[:, num_experts:] == 0).all(), bits
            assert (unpacked.sum(-1) == topk).all()
            _, bmap = kernel_impl.fused_topk_with_score_function(x, topk, **kw)
            np.testing.assert_array_equal(unpacked[:, :num_experts].astype(bool), np.asarray(bmap))


@pytest.mark.parametrize("kw", [dict(score_function="sigmoid", num_groups=8, group_topk=4),
                                dict(use_pre_softmax=True)], ids=["sigmoid-groups", "pre"])
def test_large_batch_every_row_written(kernel_impl, kw):
    """Enough rows that the CPU handler splits them over its thread pool: every chunk's rows
    are written, forward (all modes) and backward, with NaN / inf rows scattered in."""
    T, num_experts, topk = 4099, 96, 8
    rng = np.random.default_rng(7)
    x = (2.0 * rng.standard_normal((T, num_experts))).astype(np.float32)
    specials = special_rows(num_experts, seed=8)
    at = rng.choice(T, size=len(specials), replace=False)
    x[at] = specials
    x = jnp.asarray(x)
    out, _ = run_all_modes(kernel_impl, x, None, topk, kw)
    check_modes(out, x, topk)

    # rows of ordinary numbers (the reference's own gradient is NaN for logits below about
    # -88, see test_grad_finite_for_very_negative_logits)
    finite = (np.abs(np.asarray(x)) < 50).all(-1)
    ct = jnp.cos(jnp.arange(num_experts, dtype=jnp.float32))
    g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.nan_to_num(
        kernel_impl.fused_topk_with_score_function(x, topk, **kw)[0]) * ct)))(x)
    g_ref = jax.jit(jax.grad(lambda x: jnp.sum(jnp.nan_to_num(
        reference.fused_topk_with_score_function(x, topk, **kw)[0]) * ct)))(x)
    np.testing.assert_allclose(np.asarray(g)[finite], np.asarray(g_ref)[finite],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("score", ["sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("mode", ["compact", "bytemap"])
def test_grad_finite_for_very_negative_logits(impl, score, mode):
    x = jnp.asarray(np.array([[2.0, 1.0, 0.5, -100.0, -200.0, 0.0],
                              [-100.0, -101.0, -200.0, -300.0, -1e30, -3e38]], np.float32))

    def loss(x, implementation):
        if mode == "compact":
            w = jr.route_topk(x, 2, score_function=score, implementation=implementation)[0]
        else:
            w = jr.fused_topk_with_score_function(x, 2, score_function=score,
                                                  implementation=implementation)[0]
        return jnp.sum(w * jnp.arange(1.0, w.shape[-1] + 1))

    g = np.asarray(jax.grad(loss)(x, impl.implementation))
    assert np.isfinite(g).all(), f"NaN gradient from {impl}:\n{g}"
    assert (g[0, 2:] == 0).all() and (g[1, 2:] == 0).all()  # off S
    g_ref = np.asarray(jax.grad(loss)(x, "xla"))
    np.testing.assert_allclose(g[0], g_ref[0], rtol=1e-5, atol=1e-7)
    # Row 1's activations are at subnormal scale. The kernels keep subnormals
    # (docs/semantics.md#numerics); XLA may flush them (the reference on CPU does), so row 1
    # is checked against the formulas in float64 instead: selected experts 0 and 1, weights
    # s / (s0 + s1 + eps), cotangent (1, 2).
    x1 = np.array([-100.0, -101.0])
    if score == "sigmoid":
        s, ds_dx = np.zeros(2), np.zeros(2)  # 1 / (1 + e^100): e^100 overflows float32, s = 0
    else:
        # e^x is a float32 subnormal here (~5 significant bits): round it as float32 does.
        e = np.exp(x1).astype(np.float32).astype(np.float64)
        s = np.sqrt(np.log1p(e))
        ds_dx = (e / (1 + e)) / (2 * s + 1e-20)
    d = s.sum() + 1e-20
    gw = np.array([1.0, 2.0])
    expected = (gw - (gw * s).sum() / d) / d * ds_dx
    if impl.name == "xla":
        return  # the reference's own numerics, checked above where they are IEEE's
    np.testing.assert_allclose(g[1, :2], expected, rtol=1e-3, atol=0)
