"""docs/semantics.md#dispatch: dispatch_plan, permute and unpermute on every implementation (xla,
cpu, cuda), against host oracles written from the definition (tests/dispatch_util.py) and
against the pure-JAX reference; gradients; repeatability; validation.

The plan is integer data, so every implementation must give it exactly. permute copies bits,
so it is exact too. unpermute and the gradients are float32 arithmetic in a fixed order: the
kernels must match the host oracle's bits; the pure-JAX path may contract multiply-adds (XLA),
so it is compared with a tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_router as jr
from jax_router import _ffi, dispatch as jd

from .dispatch_util import (permute_oracle, plan_oracle, plan_oracle_sorted, random_ids,
                            unpermute_oracle)
from .util import FLOAT_DTYPES

F32 = np.float32


def plan_of(impl, idx, E, capacity=None):
    return impl.call(jr.dispatch_plan, idx, E, capacity=capacity)


def assert_plan(plan, idx, E, capacity, oracle=plan_oracle):
    tpe, pos, src = oracle(np.asarray(idx), E, capacity)
    np.testing.assert_array_equal(np.asarray(plan.tokens_per_expert), tpe, "tokens_per_expert")
    np.testing.assert_array_equal(np.asarray(plan.positions), pos, "positions")
    np.testing.assert_array_equal(np.asarray(plan.source), src, "source")
    assert plan.positions.dtype == jnp.int32 and plan.source.dtype == jnp.int32
    assert plan.capacity == capacity


# ---- the plan ------------------------------------------------------------------------------

# (lead shape, topk, E, load kind, capacity): T*k from 0 to many plan tiles (2048 entries each;
# 160000 entries are 79 tiles in 10 groups of 8, the last one short: on CUDA, clusters of 8
# blocks with one past the last tile; 560000 entries are 274 tiles in 9 groups of 32, counted
# by the zero and count kernels), empty and overfull experts, every capacity regime, and every
# layout of the CUDA rank kernel: shared tables with 16 warps (E <= 510), 8 (600), 4 (1000,
# 1200), 2 (1500) and 1 (2000), one warp from global tables (2500, 7000), global counts too
# (13000)
PLAN_CASES = [
    ((64,), 4, 8, "uniform", None),
    ((3000,), 3, 37, "uniform", None),
    ((1100,), 8, 256, "zipf", None),
    ((900,), 6, 16, "skewed", None),
    ((700,), 5, 20, "invalid", None),
    ((700,), 5, 20, "invalid", 50),
    ((2000,), 4, 8, "uniform", 0),
    ((2000,), 4, 8, "zipf", 1),
    ((2000,), 4, 8, "uniform", 700),
    ((2000,), 4, 8, "uniform", 5000),
    ((0,), 4, 8, "uniform", None),
    ((0,), 4, 8, "uniform", 3),
    ((1,), 1, 1, "uniform", None),
    ((1,), 3, 5, "invalid", 2),
    ((5, 7, 3), 2, 6, "uniform", None),
    ((4, 0, 3), 2, 6, "uniform", 2),
    ((20000,), 8, 256, "zipf", None),
    ((70000,), 8, 256, "uniform", None),
    ((20000,), 8, 96, "uniform", 1700),
    ((3000,), 4, 600, "uniform", None),
    ((3000,), 4, 1000, "zipf", 5),
    ((3000,), 4, 1200, "uniform", None),
    ((3000,), 4, 1500, "invalid", 4),
    ((3000,), 4, 2000, "zipf", 3),
    ((3000,), 4, 2500, "uniform", None),
    ((2, 3000), 2, 7000, "uniform", None),
    ((2, 3000), 2, 13000, "zipf", 3),
]


@pytest.mark.parametrize("case", range(len(PLAN_CASES)),
                         ids=[f"{c[0]}-k{c[1]}-E{c[2]}-{c[3]}-C{c[4]}" for c in PLAN_CASES])
def test_plan_matches_the_definition(impl, case):
    lead, k, E, kind, capacity = PLAN_CASES[case]
    rng = np.random.default_rng(case)
    dtype = (np.int32, np.int16)[case % 2] if E < 30000 else np.int32
    idx = random_ids(rng, lead + (k,), E, kind).astype(dtype)
    plan = plan_of(impl, idx, E, capacity)
    assert_plan(plan, idx, E, capacity)
    if impl.kernels:  # and the reference, the same
        ref = jr.reference.dispatch_plan(idx, E, capacity=capacity)
        for a, b in zip(jax.tree.leaves(plan), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sorted_oracle_matches_the_loop():
    rng = np.random.default_rng(11)
    for kind, capacity in (("uniform", None), ("invalid", None), ("zipf", 3), ("invalid", 0)):
        idx = random_ids(rng, (700, 3), 20, kind)
        for a, b in zip(plan_oracle(idx, 20, capacity), plan_oracle_sorted(idx, 20, capacity)):
            np.testing.assert_array_equal(a, b)


def test_plan_with_many_groups(impl):
    """4.8M entries: 2344 tiles in 37 groups of 64, more groups than a thread of the CUDA scan
    block keeps in registers (it reads the rest again), and the zero + count path."""
    rng = np.random.default_rng(12)
    idx = random_ids(rng, (600000, 8), 256, "invalid").astype(np.int32)
    assert_plan(plan_of(impl, idx, 256), idx, 256, None, oracle=plan_oracle_sorted)


def test_plan_int64_ids(impl):
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        idx = random_ids(rng, (300, 4), 12, "invalid")
        idx[0, 0], idx[1, 1] = 2**40, -(2**40)  # beyond int32: dropped, never wrapped
        plan = plan_of(impl, jnp.asarray(idx, jnp.int64), 12, 30)
        assert_plan(plan, idx, 12, 30)


def test_plan_int16_ids_with_more_experts_than_int16_holds(impl):
    idx = np.array([[1, -3], [32767, 5], [-32768, 1]], np.int16)
    plan = plan_of(impl, idx, 40000)
    assert_plan(plan, idx, 40000, None)


def test_plan_under_jit_and_repeatable(impl):
    rng = np.random.default_rng(7)
    idx = random_ids(rng, (5000, 8), 64, "zipf").astype(np.int32)
    f = impl.jit(lambda i: jr.dispatch_plan(i, 64, capacity=600,
                                            implementation=impl.implementation))
    a, b = f(idx), f(idx)
    assert_plan(a, idx, 64, 600)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_plan_workspace_size_matches_the_modules():
    modules = [m for m in (_ffi._cpu, _ffi._cuda) if m is not None]
    if not modules:
        pytest.skip("no compiled module")
    for n in (0, 1, 2047, 2048, 2049, 9000, 5 * 2048, 17 * 2048 + 3, 524288, 2**31 - 1):
        for E in (1, 256, jd._PLAN_SHARED_MAX_EXPERTS, jd._PLAN_SHARED_MAX_EXPERTS + 1, 40000):
            for module in modules:
                assert module.dispatch_plan_workspace_size(n, E) == jd.plan_workspace_size(n, E)


# ---- permute / unpermute -------------------------------------------------------------------

ROW_CASES = [  # (lead, topk, E, H, kind, capacity)
    ((300,), 4, 8, 64, "uniform", None),
    ((257,), 3, 10, 13, "invalid", None),  # odd H: the element-by-element CUDA path
    ((6, 50), 2, 5, 40, "zipf", 30),
    ((129,), 8, 16, 24, "skewed", 40),
    ((0,), 2, 4, 16, "uniform", 2),
    ((1,), 1, 1, 8, "uniform", None),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", range(len(ROW_CASES)),
                         ids=[f"{c[0]}-k{c[1]}-H{c[3]}-{c[4]}-C{c[5]}" for c in ROW_CASES])
def test_permute_and_unpermute(impl, case, dtype):
    lead, k, E, H, kind, capacity = ROW_CASES[case]
    rng = np.random.default_rng(100 + case)
    idx = random_ids(rng, lead + (k,), E, kind).astype(np.int32)
    x = rng.standard_normal(lead + (H,)).astype(dtype)
    w_dtype = FLOAT_DTYPES[case % 3]
    w = rng.standard_normal(lead + (k,)).astype(w_dtype)
    plan = plan_of(impl, idx, E, capacity)
    _, pos, src = plan_oracle(idx, E, capacity)
    rows = impl.call(jr.permute, x, plan)
    assert rows.dtype == x.dtype and rows.shape == (src.size, H)
    np.testing.assert_array_equal(np.asarray(rows), permute_oracle(x, src, k))
    # the experts' outputs: rows scaled, so that combine is not the identity
    y = (np.asarray(rows).astype(F32) * 1.5 + 0.25).astype(dtype)
    out = impl.call(jr.unpermute, y, plan, w)
    want = unpermute_oracle(y, pos, w)
    assert out.dtype == y.dtype and out.shape == lead + (H,)
    if impl.kernels:
        np.testing.assert_array_equal(np.asarray(out), want)
    else:
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(out, F32), want.astype(F32), rtol=tol, atol=tol)
    if src.size and lead[0]:
        assert np.count_nonzero(np.asarray(out, F32)) > 0  # not vacuous


def test_unpermute_of_permute_sums_the_weights(impl):
    """Without drops, unpermute(permute(x)) = x * sum_j w[t, j] (up to rounding)."""
    rng = np.random.default_rng(11)
    idx = random_ids(rng, (200, 4), 9, "uniform").astype(np.int32)
    x = rng.standard_normal((200, 32)).astype(F32)
    w = rng.random((200, 4)).astype(F32)
    plan = plan_of(impl, idx, 9)
    out = impl.call(jr.unpermute, impl.call(jr.permute, x, plan), plan, w)
    np.testing.assert_allclose(np.asarray(out), x * w.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_rows_from_a_plan_of_bad_indices(kernel_impl):
    """A plan not made by dispatch_plan (indices anywhere) never reads or writes out of bounds:
    a source outside [0, T*k) gives an empty row, a position outside [0, R) is skipped."""
    rng = np.random.default_rng(12)
    T, k, H, R = 50, 3, 16, 40
    pos = rng.integers(-5, R + 5, (T, k)).astype(np.int32)
    pos[0] = [2**31 - 1, -(2**31), R]
    src = rng.integers(-5, T * k + 5, (R,)).astype(np.int32)
    src[:2] = [2**31 - 1, -(2**31)]
    plan = jr.DispatchPlan(jnp.zeros((4,), jnp.int32), jnp.asarray(pos), jnp.asarray(src))
    x = rng.standard_normal((T, H)).astype(F32)
    w = rng.standard_normal((T, k)).astype(F32)
    rows = kernel_impl.call(jr.permute, x, plan)
    np.testing.assert_array_equal(np.asarray(rows), permute_oracle(x, src, k))
    y = rng.standard_normal((R, H)).astype(F32)
    out = kernel_impl.call(jr.unpermute, y, plan, w)
    np.testing.assert_array_equal(np.asarray(out), unpermute_oracle(y, pos, w))


# ---- gradients -----------------------------------------------------------------------------


def _grad_inputs(seed, T=40, k=3, E=6, H=20, capacity=None, dtype=F32):
    rng = np.random.default_rng(seed)
    idx = random_ids(rng, (T, k), E, "invalid" if capacity is None else "zipf").astype(np.int32)
    x = rng.standard_normal((T, H)).astype(dtype)
    w = rng.standard_normal((T, k)).astype(dtype)
    return idx, x, w, rng


@pytest.mark.parametrize("capacity", [None, 4])
def test_check_grads(impl, capacity):
    idx, x, w, _ = _grad_inputs(20, capacity=capacity)
    plan = plan_of(impl, idx, 6, capacity)
    f = lambda x, w: jr.unpermute(jnp.tanh(jr.permute(x, plan, implementation=impl.implementation)),
                                  plan, w, implementation=impl.implementation)
    check_grads(f, (jnp.asarray(x), jnp.asarray(w)), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("capacity", [None, 5])
def test_grads_match_the_reference(kernel_impl, capacity, dtype):
    idx, x, w, rng = _grad_inputs(21, T=64, k=4, E=8, H=48, capacity=capacity, dtype=dtype)
    cot = rng.standard_normal((64, 48)).astype(F32)
    plan = plan_of(kernel_impl, idx, 8, capacity)

    def loss(impl_name):
        def f(x, w):
            rows = jr.permute(x, plan, implementation=impl_name)
            rows = rows * jnp.asarray(1.25, rows.dtype) + jnp.asarray(0.5, rows.dtype)
            out = jr.unpermute(rows, plan, w, implementation=impl_name)
            return jnp.sum(out.astype(F32) * cot)
        return f

    with kernel_impl.on_device():
        gx, gw = jax.jit(jax.grad(loss("ffi"), (0, 1)))(x, w)
        rx, rw = jax.jit(jax.grad(loss("xla"), (0, 1)))(x, w)
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    tol = 1e-4 if dtype == F32 else 3e-2
    np.testing.assert_allclose(np.asarray(gx, F32), np.asarray(rx, F32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(gw, F32), np.asarray(rw, F32), rtol=tol,
                               atol=tol * 10)
    assert np.count_nonzero(np.asarray(gw, F32)) > 0
    dropped = np.asarray(plan.positions) < 0
    assert dropped.any()
    np.testing.assert_array_equal(np.asarray(gw, F32)[dropped], 0)


def test_grads_by_definition(kernel_impl):
    """The backward kernels' formulas, exactly: d x = unweighted combine of d rows; d rows =
    w[source] * dout[token] (float32 product, cast); d w = the dot in the fixed order (here
    checked to float32 accuracy against float64)."""
    idx, x, w, rng = _grad_inputs(22, T=30, k=3, E=5, H=70, capacity=4)
    plan = plan_of(kernel_impl, idx, 5, 4)
    _, pos, src = plan_oracle(idx, 5, 4)
    drows = rng.standard_normal((src.size, 70)).astype(F32)
    dout = rng.standard_normal((30, 70)).astype(F32)
    rows = rng.standard_normal((src.size, 70)).astype(F32)
    with kernel_impl.on_device():
        _, vjp = jax.vjp(lambda x: jr.permute(x, plan, implementation="ffi"), x)
        (dx,) = vjp(drows)
        _, vjp = jax.vjp(lambda r, w: jr.unpermute(r, plan, w, implementation="ffi"), rows, w)
        dr, dw = vjp(dout)
    np.testing.assert_array_equal(np.asarray(dx), unpermute_oracle(drows, pos))
    np.testing.assert_array_equal(np.asarray(dr), permute_oracle(dout, src, 3, weights=w))
    want = np.zeros((30, 3))
    for t in range(30):
        for j in range(3):
            if pos[t, j] >= 0:
                want[t, j] = np.dot(dout[t].astype(np.float64), rows[pos[t, j]].astype(np.float64))
    np.testing.assert_allclose(np.asarray(dw), want, rtol=1e-5, atol=1e-5)
    assert np.count_nonzero(want) > 0


def test_repeatable_bitwise(kernel_impl):
    idx, x, w, rng = _grad_inputs(23, T=3000, k=4, E=16, H=96, dtype=jnp.bfloat16)
    cot = rng.standard_normal((3000, 96)).astype(jnp.bfloat16)

    def program(idx, x, w, cot):
        plan = jr.dispatch_plan(idx, 16, implementation="ffi")
        f = lambda x, w: jr.unpermute(jr.permute(x, plan, implementation="ffi") * 2, plan, w,
                                      implementation="ffi")
        out, vjp = jax.vjp(f, x, w)
        return plan, out, vjp(cot)

    run = kernel_impl.jit(program)
    a = jax.tree.map(np.asarray, run(idx, x, w, cot))
    b = jax.tree.map(np.asarray, run(idx, x, w, cot))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u.view(np.uint8), v.view(np.uint8))


def test_grad_through_routing_plan_and_combine(impl):
    """A whole MoE dispatch under jax.grad: route_topk's ids (an integer output, whose tangent
    JAX instantiates as zeros) feed dispatch_plan inside the differentiated function."""
    rng = np.random.default_rng(25)
    logits = rng.standard_normal((40, 12)).astype(F32)
    x = rng.standard_normal((40, 16)).astype(F32)

    def loss(logits, x):
        w, ids = impl.route_topk(logits, 3)
        plan = jr.dispatch_plan(ids, 12, capacity=11, implementation=impl.implementation)
        rows = jr.permute(x, plan, implementation=impl.implementation)
        out = jr.unpermute(jnp.tanh(rows), plan, w, implementation=impl.implementation)
        return jnp.sum(out ** 2)

    with impl.on_device():
        g_logits, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(logits, x)
        ref = jax.grad(lambda l, x: _reference_loss(l, x), argnums=(0, 1))(logits, x)
    np.testing.assert_allclose(np.asarray(g_logits), np.asarray(ref[0]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_x), np.asarray(ref[1]), rtol=1e-4, atol=1e-5)
    assert np.count_nonzero(np.asarray(g_logits)) > 0


def _reference_loss(logits, x):
    w, ids = jr.reference.route_topk(logits, 3)
    plan = jr.reference.dispatch_plan(ids, 12, capacity=11)
    out = jr.reference.unpermute(jnp.tanh(jr.reference.permute(x, plan)), plan, w)
    return jnp.sum(out ** 2)


def test_forward_mode_is_refused_with_a_clear_error(kernel_impl):
    idx, x, w, _ = _grad_inputs(24)
    plan = plan_of(kernel_impl, idx, 6)
    with kernel_impl.on_device(), pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: jr.permute(x, plan, implementation="ffi"), (x,), (x,))


# ---- validation ----------------------------------------------------------------------------


def _plan_and_data():
    idx = np.array([[0, 1], [2, 0], [1, 3]], np.int32)
    plan = jr.dispatch_plan(idx, 4, implementation="xla")
    return idx, plan, np.ones((3, 8), F32), np.ones((3, 2), F32)


@pytest.mark.parametrize("implementation", [None, "xla", "ffi"])
@pytest.mark.parametrize("call,error,match", [
    (lambda i, p, x, w, m: jr.dispatch_plan(i.astype(F32), 4, implementation=m), TypeError,
     "topk_indices"),
    (lambda i, p, x, w, m: jr.dispatch_plan(i[0, 0], 4, implementation=m), ValueError,
     "topk_indices"),
    (lambda i, p, x, w, m: jr.dispatch_plan(i, 0, implementation=m), ValueError, "num_experts"),
    (lambda i, p, x, w, m: jr.dispatch_plan(i, 4, capacity=-1, implementation=m), ValueError,
     "capacity"),
    (lambda i, p, x, w, m: jr.dispatch_plan(i, 4, capacity=2.5, implementation=m), TypeError,
     "capacity"),
    (lambda i, p, x, w, m: jr.permute(x.astype(np.int32), p, implementation=m), TypeError, "x"),
    (lambda i, p, x, w, m: jr.permute(x[:2], p, implementation=m), ValueError, "x must"),
    (lambda i, p, x, w, m: jr.permute(x, (p.positions,), implementation=m), TypeError, "plan"),
    (lambda i, p, x, w, m: jr.unpermute(x, p, w, implementation=m), ValueError, "rows"),
    (lambda i, p, x, w, m: jr.unpermute(np.ones((6, 8), F32), p, w[:, :1], implementation=m),
     ValueError, "topk_weights"),
    (lambda i, p, x, w, m: jr.unpermute(np.ones((6, 8), F32), p, w.astype(np.int32),
                                        implementation=m), TypeError, "topk_weights"),
    (lambda i, p, x, w, m: jr.permute(x, p, implementation="cuda"), ValueError,
     "implementation"),
])
def test_validation_names_the_argument(implementation, call, error, match):
    if implementation == "ffi" and "cpu" not in _ffi.kernel_platforms():
        pytest.skip("no CPU kernels in this build")
    idx, plan, x, w = _plan_and_data()
    with pytest.raises(error, match=match):
        call(idx, plan, x, w, implementation)

