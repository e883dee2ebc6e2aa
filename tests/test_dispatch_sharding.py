"""docs/semantics.md#dispatch, sharding: the dispatch ops under jax.jit with token-sharded inputs
give the global result (the custom calls are not partitioned: XLA gathers their operands and
runs them replicated), inside shard_map each device plans and moves its own tokens, and vmap
plans each batch member on its own.

Runs on every local device: the 8 host CPU devices tests/conftest.py asks for, or the GPUs of
a multi-GPU machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_router as jr

from .dispatch_util import plan_oracle, random_ids, unpermute_oracle

NDEV = jax.device_count()
pytestmark = pytest.mark.skipif(NDEV < 2 or NDEV % 2, reason="needs an even number of devices")
T, K, E, H = 64, 4, 10, 24  # T is a multiple of every device count used here
F32 = np.float32


def _mesh(kind="auto"):
    axis_type = AxisType.Auto if kind == "auto" else AxisType.Explicit
    return jax.sharding.Mesh(np.array(jax.devices()), ("x",), axis_types=(axis_type,))


def _inputs(seed, capacity_kind="zipf"):
    rng = np.random.default_rng(seed)
    idx = random_ids(rng, (T, K), E, capacity_kind).astype(np.int32)
    idx[3, 1] = -1  # a dropped id among them
    x = rng.standard_normal((T, H)).astype(F32)
    w = rng.standard_normal((T, K)).astype(F32)
    cot = rng.standard_normal((T, H)).astype(F32)
    return idx, x, w, cot


def _program(implementation, capacity):
    def f(idx, x, w, cot):
        plan = jr.dispatch_plan(idx, E, capacity=capacity, implementation=implementation)
        g = lambda x, w: jr.unpermute(
            jnp.sin(jr.permute(x, plan, implementation=implementation)), plan, w,
            implementation=implementation)
        out, vjp = jax.vjp(g, x, w)
        return plan, out, vjp(cot)

    return f


@pytest.mark.parametrize("implementation", ["ffi", "xla"])
@pytest.mark.parametrize("capacity", [None, 12])
def test_jit_with_token_sharded_inputs_is_global(implementation, capacity):
    idx, x, w, cot = _inputs(1)
    f = jax.jit(_program(implementation, capacity))
    want = jax.tree.map(np.asarray, f(idx, x, w, cot))
    mesh = _mesh()
    rows = NamedSharding(mesh, P("x"))
    args = [jax.device_put(a, rows) for a in (idx, x, w, cot)]
    got = jax.tree.map(np.asarray, f(*args))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if implementation == "xla" and a.dtype.kind == "f":
            # XLA may fuse the sharded program's multiply-adds differently (on GPU: an ulp)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)
    tpe, pos, src = plan_oracle(idx, E, capacity)  # the global plan, not per shard
    np.testing.assert_array_equal(got[0].positions, pos)
    np.testing.assert_array_equal(got[0].source, src)


def test_explicit_mesh_axes_give_the_global_result_and_typed_gradients():
    """With Explicit mesh axes the gradients come back with their inputs' token sharding (the
    custom_vjp's backward must return the input types exactly)."""
    idx, x, w, cot = _inputs(5)
    f = jax.jit(_program("ffi", None))
    want = jax.tree.map(np.asarray, f(idx, x, w, cot))
    mesh = _mesh("explicit")
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, NamedSharding(mesh, P("x"))) for a in (idx, x, w, cot)]
        got = f(*args)
        dx, dw = got[2]
        assert jax.typeof(dx).sharding.spec == jax.typeof(args[1]).sharding.spec
        assert jax.typeof(dw).sharding.spec == jax.typeof(args[2]).sharding.spec
        got = jax.tree.map(np.asarray, got)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_shard_map_plans_each_device_alone():
    idx, x, w, cot = _inputs(2)
    mesh = _mesh("explicit")
    capacity = 3
    prog = _program("ffi", capacity)

    def body(idx, x, w, cot):
        plan, out, (dx, dw) = prog(idx, x, w, cot)
        return plan.tokens_per_expert[None], plan.positions, plan.source[None], out, dx, dw

    sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, NamedSharding(mesh, P("x"))) for a in (idx, x, w, cot)]
        got = jax.tree.map(np.asarray, sm(*args))
    per = T // NDEV
    one = jax.jit(prog)
    for d in range(NDEV):
        sl = slice(d * per, (d + 1) * per)
        plan, out, (dx, dw) = jax.tree.map(np.asarray, one(idx[sl], x[sl], w[sl], cot[sl]))
        tpe, pos, src = plan_oracle(idx[sl], E, capacity)  # local rows, local ids
        np.testing.assert_array_equal(got[0][d], tpe)
        np.testing.assert_array_equal(got[1][sl], pos)
        np.testing.assert_array_equal(got[2][d], src)
        np.testing.assert_array_equal(got[3][sl], out)
        np.testing.assert_array_equal(got[4][sl], dx)
        np.testing.assert_array_equal(got[5][sl], dw)
    assert np.count_nonzero(got[3]) > 0


def test_plan_made_outside_shard_map_meets_varying_tokens():
    """A replicated plan used with per-device tokens (its arrays are made varying)."""
    idx, x, w, _ = _inputs(3)
    mesh = _mesh("explicit")
    per = T // NDEV
    local_idx = idx[:per]
    plan = jr.dispatch_plan(local_idx, E, implementation="ffi")
    body = lambda x: jr.permute(x, plan, implementation="ffi")
    sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    with jax.set_mesh(mesh):
        got = np.asarray(sm(jax.device_put(x, NamedSharding(mesh, P("x")))))
    R = per * K
    for d in range(NDEV):
        want = np.asarray(jr.permute(x[d * per:(d + 1) * per], plan, implementation="ffi"))
        np.testing.assert_array_equal(got[d * R:(d + 1) * R], want)


@pytest.mark.parametrize("implementation", ["ffi", "xla"])
def test_vmap_plans_each_batch_member(implementation):
    rng = np.random.default_rng(4)
    idx = random_ids(rng, (3, 20, K), E, "zipf").astype(np.int32)
    x = rng.standard_normal((3, 20, H)).astype(F32)
    w = rng.standard_normal((3, 20, K)).astype(F32)

    def f(idx, x, w):
        plan = jr.dispatch_plan(idx, E, capacity=5, implementation=implementation)
        rows = jr.permute(x, plan, implementation=implementation)
        return plan.positions, jr.unpermute(rows * 2, plan, w, implementation=implementation)

    pos, out = jax.jit(jax.vmap(f))(idx, x, w)
    for b in range(3):
        _, want_pos, _ = plan_oracle(idx[b], E, 5)
        np.testing.assert_array_equal(np.asarray(pos[b]), want_pos)
        want = unpermute_oracle(
            2 * np.asarray(jr.permute(x[b], jr.dispatch_plan(idx[b], E, capacity=5))), want_pos,
            w[b])
        np.testing.assert_allclose(np.asarray(out[b]), want, rtol=1e-6, atol=1e-6)
