"""Sharding (docs/semantics.md#jax): under jax.jit with NamedSharding, token-sharded logits are routed
locally on each device (no all-gather / all-to-all / collective-permute of the token dims, in
the forward and in the gradient), outputs keep the token sharding, the expert dim is always
whole, in Auto and Explicit meshes; plus data-parallel training of a tiny MoE layer and a
two-process run.

Runs on every local device: the 8 host CPU devices that tests/conftest.py asks for, or the GPUs
of a multi-GPU machine (2 H100s: the 4x2 mesh becomes 2x1).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import config as jax_config
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_router as jr

from .util import random_bias

E, K = 16, 3

NDEV = jax.device_count()
pytestmark = pytest.mark.skipif(NDEV < 2 or NDEV % 2, reason="needs an even number of devices")
# Two mesh axes over all devices: (4, 2) on the 8 host devices; (2, 1) on 2 GPUs, where the
# second axis is trivial but still goes through the multi-axis partitioning.
MESH_SHAPE = (NDEV // 2, 2) if NDEV >= 4 else (NDEV, 1)

# Collectives that would move token rows between devices. (An all-reduce is allowed in
# principle - e.g. summing a replicated parameter's gradient - but none of the router programs
# below needs one: the expert bias's gradient is a constant zero.)
MOVES_ROWS = ("all-gather", "all-to-all", "collective-permute")
COLLECTIVES = MOVES_ROWS + ("all-reduce", "reduce-scatter")


def make_mesh(kind, shape=MESH_SHAPE, names=("x", "y")):
    """A mesh over the first prod(shape) devices with Auto or Explicit axes."""
    n = int(np.prod(shape))
    devices = np.array(jax.devices()[:n]).reshape(shape)
    axis_type = AxisType.Auto if kind == "auto" else AxisType.Explicit
    return jax.sharding.Mesh(devices, names, axis_types=(axis_type,) * len(shape))


def logits(seed, shape, scale=2.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape, np.float32))


# Output modes (route_topk for "compact", the fused function for the others) and the score
# configuration each is tested with; both configurations exercise the backward's extra inputs.
MODES = {
    "compact": (jr.route_topk, dict(score_function="sigmoid", bias=True)),
    "dense": (jr.fused_topk_with_score_function,
              dict(use_pre_softmax=True, topk_indices_dtype=jnp.int32)),
    "bytemap": (jr.fused_topk_with_score_function, dict(score_function="sigmoid", bias=True,
                                                        num_groups=4, group_topk=1)),
    "bitmap": (jr.fused_topk_with_score_function,
               dict(score_function="sqrtsoftplus", bias=True, routing_map_format="bitmap_u8")),
}


def router(mode):
    fn, kw = MODES[mode]
    kw = dict(kw)
    with_bias = kw.pop("bias", False)

    def f(x, b):
        return fn(x, K, expert_bias=b if with_bias else None, **kw)

    def loss(x, b):
        w = f(x, b)[0].astype(jnp.float32)
        return jnp.sum(w * jnp.cos(jnp.arange(w.shape[-1], dtype=jnp.float32)))

    return f, jax.grad(loss, argnums=(0, 1))


def assert_equal_outputs(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def router_calls(hlo):
    """The compiled program's jax_router custom calls: (target, first operand's shape)."""
    calls = []
    for line in hlo.splitlines():
        m = re.search(r'custom_call_target="(jax_router_\w+)"', line)
        if m:
            shape = re.search(r"operand_layout_constraints=\{\w+\[([\d,]*)\]", line)
            calls.append((m[1], tuple(int(d) for d in shape[1].split(",") if d)))
    return calls


def assert_local(hlo, local_rows, what):
    """No collective at all, and every router call runs on `local_rows` token rows."""
    found = [c for c in COLLECTIVES if c in hlo]
    assert not found, f"{what}: {found} in the compiled program"
    calls = router_calls(hlo)
    assert calls, what
    for target, shape in calls:
        assert int(np.prod(shape[:-1])) == local_rows, (what, target, shape, local_rows)


# (logits shape, token PartitionSpec) on the MESH_SHAPE mesh ("x", "y"): 2-D and 3-D (and 4-D) logits,
# token dims sharded on one axis, on two axes of one dim, and on two dims.
LAYOUTS = {
    "2d_x": ((16, E), P("x")),
    "2d_xy": ((16, E), P(("x", "y"))),
    "3d_x_y": ((8, 4, E), P("x", "y")),
    "3d_yx_none": ((8, 4, E), P(("y", "x"), None)),
    "4d_x_none_y": ((4, 3, 2, E), P("x", None, "y")),
}


def local_rows(mesh, shape, spec):
    rows = 1
    for i, size in enumerate(shape[:-1]):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        rows *= size // int(np.prod([mesh.shape[a] for a in axes]))
    return rows


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_sharded_routing_is_local(kind, layout):
    shape, spec = LAYOUTS[layout]
    mesh = make_mesh(kind)
    x = logits(1, shape)
    b = random_bias(1, E)
    rows = local_rows(mesh, shape, spec)
    token_spec = tuple(spec) + (None,) * (len(shape) - 1 - len(spec))
    for mode in MODES:
        f, g = router(mode)
        want, want_grad = jax.jit(f)(x, b), jax.jit(g)(x, b)  # one device
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, spec))
            fc = jax.jit(f).lower(xs, b).compile()
            gc = jax.jit(g).lower(xs, b).compile()
            got, got_grad = fc(xs, b), gc(xs, b)
        assert_equal_outputs(got, want)
        assert_equal_outputs(got_grad, want_grad)
        assert np.abs(np.asarray(got_grad[0])).max() > 0
        assert_local(fc.as_text(), rows, f"{mode} forward")
        assert_local(gc.as_text(), rows, f"{mode} grad")
        assert [t for t, _ in router_calls(gc.as_text())] == ["jax_router_fwd", "jax_router_bwd"]
        # outputs and the logits' gradient keep the token sharding, last dim whole
        for out in list(got) + [got_grad[0]]:
            assert out.sharding.is_equivalent_to(
                NamedSharding(mesh, P(*token_spec, None)), out.ndim), (mode, out.sharding)


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("spec", [P(None, "x"), P("x", "y")], ids=["experts", "tokens_experts"])
def test_expert_sharded_logits_are_gathered(kind, spec):
    """An expert-sharded input is made whole (never routed per shard): correct results, and
    token rows that were local stay local."""
    if spec[-1] == "y" and MESH_SHAPE[1] == 1:
        pytest.skip("the expert axis 'y' is trivial on this many devices")
    mesh = make_mesh(kind)
    x = logits(2, (16, E))
    b = random_bias(2, E)
    for mode in ("compact", "bitmap"):
        f, g = router(mode)
        want, want_grad = jax.jit(f)(x, b), jax.jit(g)(x, b)
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, spec))
            got, got_grad = jax.jit(f)(xs, b), jax.jit(g)(xs, b)
            hlo = jax.jit(f).lower(xs, b).compile().as_text()
        assert_equal_outputs(got, want)
        assert_equal_outputs(got_grad, want_grad)
        assert "all-gather" in hlo  # the expert dim is gathered ...
        for _, shape in router_calls(hlo):  # ... and the kernel sees whole rows
            assert shape[-1] == E
            assert int(np.prod(shape[:-1])) == (16 if spec[0] is None else 16 // mesh.shape["x"])
        if spec[0] is not None:
            assert got[0].sharding.is_equivalent_to(NamedSharding(mesh, P("x", None)), 2)


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_sharded_indices_buffer_and_vmapped_bias(kind):
    mesh = make_mesh(kind)
    # an aliased topk_indices buffer, sharded like the tokens
    x = logits(3, (16, E))
    fb = lambda x, buf: jr.fused_topk_with_score_function(x, K, topk_indices=buf)
    buf = jnp.full((16, K), -7, jnp.int32)
    want = jax.jit(fb)(x, buf)
    # vmap with one bias row per batch member, the token dim sharded
    xv = logits(4, (4, 8, E))
    biases = logits(5, (4, E))
    fv = jax.vmap(lambda x, b: jr.route_topk(x, K, score_function="sigmoid", expert_bias=b))
    gv = jax.grad(lambda x, b: jnp.sum(fv(x, b)[0] ** 2))
    want_v, want_gv = jax.jit(fv)(xv, biases), jax.jit(gv)(xv, biases)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("x", "y"))))
        bufs = jax.device_put(buf, NamedSharding(mesh, P(("x", "y"))))
        c = jax.jit(fb, donate_argnums=1).lower(xs, bufs).compile()
        got = c(xs, bufs)
        xvs = jax.device_put(xv, NamedSharding(mesh, P(None, ("x", "y"))))
        cv = jax.jit(fv).lower(xvs, biases).compile()
        cg = jax.jit(gv).lower(xvs, biases).compile()
        got_v, got_gv = cv(xvs, biases), cg(xvs, biases)
    assert_equal_outputs(got, want)
    assert_local(c.as_text(), 16 // NDEV, "indices buffer")
    assert_equal_outputs(got_v, want_v)
    np.testing.assert_array_equal(np.asarray(got_gv), np.asarray(want_gv))
    assert_local(cv.as_text(), 32 // NDEV, "vmap forward")
    assert_local(cg.as_text(), 32 // NDEV, "vmap grad")


def test_router_inside_shard_map():
    """The same custom calls under shard_map (manual axes): local rows, vma-typed outputs,
    gradients equal to one device."""
    mesh = make_mesh("explicit")
    x = logits(6, (16, 2, E))
    b = random_bias(6, E)
    f, g = router("compact")
    body = jax.shard_map(lambda x, b: (f(x, b), g(x, b)), mesh=mesh,
                         in_specs=(P(("x", "y")), P()), out_specs=(P(("x", "y")), P(("x", "y"))))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("x", "y"))))
        c = jax.jit(body).lower(xs, b).compile()
        (got, (gx, gb)) = c(xs, b)
    # the bias gradient is summed over the devices by shard_map's out_specs (zeros anyway)
    assert_equal_outputs(got, jax.jit(f)(x, b))
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(jax.jit(g)(x, b)[0]))
    np.testing.assert_array_equal(np.asarray(gb), 0)
    assert not [m for m in MOVES_ROWS if m in c.as_text()]


def test_gspmd_partitioner():
    """Without Shardy (GSPMD), XLA's batch partitioner alone gives the same local program."""
    mesh = make_mesh("auto")
    x = logits(7, (8, 4, E))
    b = random_bias(7, E)
    f, g = router("bitmap")
    with jax_config.use_shardy_partitioner(False), jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("x", "y")))
        fc, gc = jax.jit(f).lower(xs, b).compile(), jax.jit(g).lower(xs, b).compile()
        got, got_grad = fc(xs, b), gc(xs, b)
    assert_equal_outputs(got, jax.jit(f)(x, b))
    assert_equal_outputs(got_grad, jax.jit(g)(x, b))
    assert_local(fc.as_text(), 32 // NDEV, "forward")
    assert_local(gc.as_text(), 32 // NDEV, "grad")


def test_one_device_lowering_is_the_plain_custom_call():
    """Unsharded programs (and so jax.export of them) carry no partitioning annotations; a
    partitioned one carries num_batch_dims and a Shardy rule."""
    x = logits(8, (6, E))
    f, g = router("dense")
    for fn in (f, g):
        text = jax.jit(fn).lower(x, random_bias(8, E)).as_text()
        assert "jax_router_fwd" in text
        assert "num_batch_dims" not in text and "sdy.sharding_rule" not in text
    mesh = make_mesh("auto")
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("y")))
        text = jax.jit(g).lower(xs, random_bias(8, E)).as_text()
    assert text.count('num_batch_dims = "2"') == 2  # fwd and bwd, 2-D widened to [T, 1, X]
    assert text.count("sdy.sharding_rule") == 2


# ---- data-parallel training of a tiny MoE layer ------------------------------------------

D, H, NE, KE = 8, 16, 8, 2  # model dim, expert hidden dim, experts, experts per token


def moe_params(seed=0):
    r = np.random.default_rng(seed)
    return dict(
        gate=jnp.asarray(r.standard_normal((D, NE), np.float32)),
        w1=jnp.asarray(0.3 * r.standard_normal((NE, D, H), np.float32)),
        w2=jnp.asarray(0.3 * r.standard_normal((NE, H, D), np.float32)),
    )


def moe_group(params, x):
    """One token group [t, D]: gate -> route_topk -> sort by expert id -> expert MLPs ->
    unsort -> weighted combine."""
    t = x.shape[0]
    weights, idx = jr.route_topk(x @ params["gate"], KE, score_function="sigmoid")
    expert = idx.reshape(-1)  # [t * KE]
    order = jnp.argsort(expert, stable=True)
    e_sorted = expert[order]
    x_sorted = x[order // KE]  # the token of each (token, slot), grouped by expert
    # each sorted row through its expert's MLP (the expert's weights selected with a one-hot
    # contraction, which shards like any matmul in Explicit meshes)
    sel = jax.nn.one_hot(e_sorted, NE, dtype=x.dtype)
    h = jax.nn.gelu(jnp.einsum("md,me,edh->mh", x_sorted, sel, params["w1"]))
    y_sorted = jnp.einsum("mh,me,ehd->md", h, sel, params["w2"])
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, KE, D)
    return jnp.sum(y * weights[..., None], axis=1)


def moe_loss(params, x, target):
    """x, target: [G, t, D]; each group is dispatched on its own (vmap)."""
    out = jax.vmap(moe_group, in_axes=(None, 0))(params, x)
    return jnp.mean((out - target) ** 2)


def sgd_step(params, x, target):
    loss, grads = jax.value_and_grad(moe_loss)(params, x, target)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss


def train(step, params, x, target, steps=4):
    losses = []
    for _ in range(steps):
        params, loss = step(params, x, target)
        losses.append(float(loss))
    return params, losses


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_data_parallel_moe_training(kind):
    r = np.random.default_rng(7)
    x = jnp.asarray(r.standard_normal((8, 8, D), np.float32))  # 8 groups of 8 tokens
    target = jnp.asarray(r.standard_normal((8, 8, D), np.float32))
    params = moe_params()
    # full float32 matmuls (GPUs default to TF32), so both runs compute the same sums
    with jax.default_matmul_precision("float32"):
        _train_and_compare(kind, x, target, params)


def _train_and_compare(kind, x, target, params):
    want_params, want_losses = train(jax.jit(sgd_step), params, x, target)
    assert want_losses[-1] < want_losses[0]

    mesh = make_mesh(kind, (NDEV,), ("data",))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        ts = jax.device_put(target, NamedSharding(mesh, P("data")))
        ps = jax.device_put(params, NamedSharding(mesh, P()))
        step = jax.jit(sgd_step)
        hlo = step.lower(ps, xs, ts).compile().as_text()
        got_params, got_losses = train(step, ps, xs, ts)
    # each device routes and dispatches its own group; only the gradients (and loss) are summed
    assert not [c for c in MOVES_ROWS if c in hlo], hlo
    for _, shape in router_calls(hlo):
        assert int(np.prod(shape[:-1])) == 64 // NDEV, shape
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(np.asarray(got_params[name]), np.asarray(want_params[name]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


# ---- two processes -----------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2,
                               process_id=pid, initialization_timeout=60)
    import jax_router as jr
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    x = np.load(out + "/x.npy")
    b = np.load(out + "/b.npy")
    mesh = jax.make_mesh((4,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    xs = jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
    bs = jax.make_array_from_callback(b.shape, NamedSharding(mesh, P()), lambda i: b[i])

    def loss(x, b):
        w, _ = jr.route_topk(x, 3, score_function="sigmoid", expert_bias=b)
        return jnp.sum(w * jnp.cos(jnp.arange(3.0)))

    f = jax.jit(lambda x, b: jr.route_topk(x, 3, score_function="sigmoid", expert_bias=b))
    g = jax.jit(jax.grad(loss))
    hlo = f.lower(xs, bs).compile().as_text() + g.lower(xs, bs).compile().as_text()
    w, i = f(xs, bs)
    gx = g(xs, bs)
    shards = {}
    for name, a in (("w", w), ("i", i), ("g", gx)):
        for s in a.addressable_shards:
            start = s.index[0].start or 0
            np.save(f"{out}/{name}_{start}.npy", np.asarray(s.data))
            shards.setdefault(name, []).append(start)
    gathered = [c for c in ("all-gather", "all-to-all", "collective-permute") if c in hlo]
    json.dump(dict(shards=shards, gathered=gathered), open(f"{out}/p{pid}.json", "w"))
    jax.distributed.shutdown()
""")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes(tmp_path):
    x = np.asarray(logits(9, (16, E)))
    b = np.asarray(random_bias(9, E))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "b.npy", b)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, port, str(pid), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    # the children run on CPU: so does the single-process result (on a GPU machine too)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        want = _single_process_route(x, b)
    starts = set()
    for pid in (0, 1):
        info = json.loads((tmp_path / f"p{pid}.json").read_text())
        assert info["gathered"] == [], info
        for name, rows in info["shards"].items():
            for start in rows:
                got = np.load(tmp_path / f"{name}_{start}.npy")
                assert got.shape[0] == 4  # 16 tokens over 4 devices
                np.testing.assert_array_equal(got, want[name][start:start + 4], err_msg=name)
                starts.add(start)
    assert starts == {0, 4, 8, 12}


def _single_process_route(x, b):
    b = jnp.asarray(b)
    w, i = jr.route_topk(jnp.asarray(x), 3, score_function="sigmoid", expert_bias=b)
    gx = jax.grad(lambda x: jnp.sum(jr.route_topk(x, 3, score_function="sigmoid",
                                                  expert_bias=b)[0]
                                    * jnp.cos(jnp.arange(3.0))))(jnp.asarray(x))
    want = dict(w=np.asarray(w), i=np.asarray(i), g=np.asarray(gx))
    return want
