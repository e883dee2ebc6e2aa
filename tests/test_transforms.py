"""docs/semantics.md#api, #shapes, #jax: jit, vmap, grad, leading dims, empty batches, jax.export, the custom calls
in the compiled program, compact residuals, and aliasing / donation of a topk_indices buffer.

These are properties of the custom calls (their custom_vjp, batching and partitioning rules,
aliasing): most tests run on each kernel implementation (`kernel_impl`: bitwise equalities that
pure JAX, whose numerics XLA may change between eager and jit, does not promise); a few run on
every implementation (`impl`); export and multi-device tests use the default backend."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_router as jr
from jax_router import reference

from . import impls
from .util import random_bias

E, K = 16, 3

# Output modes: name -> keyword arguments (route_topk for "compact*", else the fused function).
MODES = {
    "compact": dict(),
    "compact_i16": dict(index_dtype=jnp.int16),
    "bytemap": dict(),
    "bitmap": dict(routing_map_format="bitmap_u8"),
    "dense_i32": dict(topk_indices_dtype=jnp.int32),
    "dense_i16": dict(topk_indices_dtype=jnp.int16),
}
# Score configurations: (score_function, use_pre_softmax, bias, groups)
CONFIGS = {
    "softmax": dict(score_function="softmax"),
    "pre_softmax": dict(score_function="softmax", use_pre_softmax=True),
    "sigmoid_bias_groups": dict(score_function="sigmoid", bias=True, num_groups=4, group_topk=1,
                                scaling_factor=2.5),
    "sqrtsoftplus_bias": dict(score_function="sqrtsoftplus", bias=True),
}

DISABLED = [
    export.DisabledSafetyCheck.custom_call("jax_router_fwd"),
    export.DisabledSafetyCheck.custom_call("jax_router_bwd"),
]


_STATIC = ("topk", "use_pre_softmax", "num_groups", "group_topk", "scaling_factor",
           "score_function")
# The reference, compiled once per static configuration (much faster than op-by-op).
REF_FUSED = jax.jit(reference.fused_topk_with_score_function,
                    static_argnames=_STATIC + ("routing_map_format", "topk_indices_dtype"))
REF_COMPACT = jax.jit(reference.route_topk, static_argnames=_STATIC + ("index_dtype",))


def route(mode, x, k=K, impl=None, bias=None, **kw):
    """Calls the router in output mode `mode`. impl: an implementation (tests/impls.py: the
    public function with its implementation=), None (the public function's default), "ref"
    (the jitted reference) or "ref_eager" (the reference without jit)."""
    kw = {**MODES[mode], **kw}
    if bias is not None:
        kw["expert_bias"] = bias
    compact = mode.startswith("compact")
    if impl is None or isinstance(impl, impls.Impl):
        fn = jr.route_topk if compact else jr.fused_topk_with_score_function
        if impl is not None:
            kw["implementation"] = impl.implementation
    elif impl == "ref_eager":
        fn = reference.route_topk if compact else reference.fused_topk_with_score_function
    else:
        fn = REF_COMPACT if compact else REF_FUSED
    return fn(x, topk=k, **kw)


def np_logits(seed, shape, dtype=jnp.float32, scale=2.0):
    """Random normal logits made on the host (no compilation per shape)."""
    x = scale * np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(x.astype(jnp.dtype(dtype)))


def host(outs):
    return [np.asarray(o) for o in outs]


def config_kwargs(name, num_experts=E, seed=0):
    kw = dict(CONFIGS[name])
    if kw.pop("bias", False):
        kw["bias"] = random_bias(seed, num_experts)
    return kw


def loss_of(mode, **kw):
    """A scalar loss of the router's float output with a non-uniform cotangent."""

    def loss(x):
        w = route(mode, x, **kw)[0]
        return jnp.sum(w.astype(jnp.float32) * jnp.cos(jnp.arange(w.shape[-1], dtype=jnp.float32)))

    return loss


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype, (u.shape, u.dtype, v.shape, v.dtype)
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def assert_batch_equals_loop(batched, per_item, n, axis=0):
    """batched outputs, sliced on `axis` (on the host), equal per_item(i) for i < n."""
    batched = host(batched)
    for i in range(n):
        assert_same([np.take(o, i, axis=axis) for o in batched], host(per_item(i)))


def assert_close_to_reference(out, ref):
    """Indices / maps exactly, floats to float32 rounding (random inputs: no near-ties)."""
    for u, v in zip(out, ref):
        assert u.shape == v.shape and u.dtype == v.dtype, (u.shape, u.dtype, v.shape, v.dtype)
        if jnp.issubdtype(u.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32),
                                       rtol=2e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ---- jit ---------------------------------------------------------------------------------


def pairs(*modes_configs):
    return pytest.mark.parametrize("mode,config", modes_configs,
                                   ids=["-".join(c) for c in modes_configs])


# each output mode with two score configurations, every configuration at least twice
MODE_CONFIGS = [
    ("compact", "softmax"), ("compact", "sigmoid_bias_groups"),
    ("compact_i16", "pre_softmax"), ("compact_i16", "sqrtsoftplus_bias"),
    ("bytemap", "pre_softmax"), ("bytemap", "sigmoid_bias_groups"),
    ("bitmap", "softmax"), ("bitmap", "sqrtsoftplus_bias"),
    ("dense_i32", "pre_softmax"), ("dense_i32", "sigmoid_bias_groups"),
    ("dense_i16", "softmax"), ("dense_i16", "sqrtsoftplus_bias"),
]


@pairs(*MODE_CONFIGS)
def test_jit_equals_eager_and_reference(kernel_impl, mode, config):
    x = np_logits(1, (7, E))
    kw = config_kwargs(config)
    eager = route(mode, x, impl=kernel_impl, **kw)
    jitted = jax.jit(lambda x: route(mode, x, impl=kernel_impl, **kw))(x)
    assert_same(jitted, eager)
    assert_close_to_reference(eager, route(mode, x, impl="ref", **kw))


@pytest.mark.parametrize("config", CONFIGS)
def test_jit_grad_equals_eager_grad(kernel_impl, config):
    x = np_logits(2, (7, E))
    kw = config_kwargs(config)
    for mode in ("compact", "bytemap", "dense_i32"):
        g = jax.grad(loss_of(mode, impl=kernel_impl, **kw))(x)
        gj = jax.jit(jax.grad(loss_of(mode, impl=kernel_impl, **kw)))(x)
        np.testing.assert_array_equal(np.asarray(gj), np.asarray(g))
        assert np.abs(np.asarray(g)).max() > 0


# ---- vmap --------------------------------------------------------------------------------


def assert_no_loop(jaxpr):
    text = str(jaxpr)
    for prim in ("scan", "while"):
        assert not re.search(rf"\b{prim}\[", text), f"vmap produced a {prim} loop:\n{text}"
    assert "jax_router_fwd" in text


def item(a, *index):
    """a[index] taken on the host and put back on the device (no per-shape compilation)."""
    return jnp.asarray(np.asarray(a)[index])


@pytest.mark.parametrize("mode", MODES)
def test_vmap_is_one_call_and_equals_loop(kernel_impl, mode):
    x = np_logits(3, (4, 5, E))
    f = lambda x: route(mode, x, impl=kernel_impl)
    jaxpr = jax.make_jaxpr(jax.vmap(f))(x)
    assert_no_loop(jaxpr)
    assert str(jaxpr).count("target_name=jax_router_fwd") == 1
    out = jax.vmap(f)(x)
    assert_batch_equals_loop(out, lambda i: f(item(x, i)), 4)
    assert_same(jax.jit(jax.vmap(f))(x), out)


@pairs(("compact", "sigmoid_bias_groups"), ("bytemap", "sqrtsoftplus_bias"),
       ("dense_i16", "sigmoid_bias_groups"))
def test_vmap_with_batched_bias(kernel_impl, mode, config):
    x = np_logits(4, (3, 5, E))
    kw = dict(config_kwargs(config), impl=kernel_impl)
    del kw["bias"]
    # large, distinct biases per batch member, so that a mixed-up bias row changes the routing
    biases = np_logits(9, (3, E))
    f = lambda x, b: route(mode, x, bias=b, **kw)

    assert_no_loop(jax.make_jaxpr(jax.vmap(f))(x, biases))
    out = jax.vmap(f)(x, biases)
    assert_batch_equals_loop(out, lambda i: f(item(x, i), item(biases, i)), 3)
    ref = jax.vmap(lambda x, b: route(mode, x, bias=b, **{**kw, "impl": "ref"}))(x, biases)
    assert_close_to_reference(out, ref)
    # the bias must matter here, or this test proves nothing
    unbiased = jax.vmap(lambda x: route(mode, x, **kw))(x)
    assert not np.array_equal(np.asarray(unbiased[1]), np.asarray(out[1]))

    # only the bias batched
    out = jax.vmap(f, in_axes=(None, 0))(item(x, 0), biases)
    assert_batch_equals_loop(out, lambda i: f(item(x, 0), item(biases, i)), 3)

    # batch axis not leading
    xt = item(np.swapaxes(np.asarray(x), 0, 1))  # [5, 3, E]
    out = jax.vmap(f, in_axes=(1, 0), out_axes=1)(xt, biases)
    assert_batch_equals_loop(out, lambda i: f(item(x, i), item(biases, i)), 3, axis=1)

    # two levels of vmap, the bias batched on the outer level only
    x4 = np_logits(5, (3, 2, 4, E))
    out = host(jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(0, 0))(x4, biases))
    for j in range(2):
        assert_batch_equals_loop([o[:, j] for o in out],
                                 lambda i: f(item(x4, i, j), item(biases, i)), 3)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode", ["compact", "bytemap", "dense_i16"])
def test_vmap_of_grad(kernel_impl, mode, config):
    x = np_logits(6, (4, 5, E))
    kw = dict(config_kwargs(config), impl=kernel_impl)
    bias = kw.pop("bias", None)
    if bias is not None:
        biases = np_logits(10, (4, E))
        g = lambda x, b: jax.grad(loss_of(mode, bias=b, **kw))(x)
        args = (x, biases)
    else:
        g = lambda x: jax.grad(loss_of(mode, **kw))(x)
        args = (x,)
    jaxpr = jax.make_jaxpr(jax.vmap(g))(*args)
    assert_no_loop(jaxpr)
    assert "jax_router_bwd" in str(jaxpr)
    out = np.asarray(jax.vmap(g)(*args))
    gj = jax.jit(g)
    for i in range(4):
        want = gj(*(item(a, i) for a in args))
        np.testing.assert_allclose(out[i], np.asarray(want), rtol=1e-6, atol=1e-7)


def test_expert_bias_gets_zero_cotangent(impl):
    x = np_logits(7, (5, E))
    b = random_bias(7, E)
    for mode in ("compact", "bytemap", "dense_i32"):
        f = lambda x, b: jnp.sum(route(mode, x, impl=impl, bias=b, score_function="sigmoid")[0]
                                 ** 2)
        gx, gb = jax.grad(f, argnums=(0, 1))(x, b)
        assert gb.shape == (E,) and gb.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(gb), 0)
        assert np.abs(np.asarray(gx)).max() > 0


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int16])
def test_vmap_with_indices_buffer(kernel_impl, dtype):
    x = np_logits(8, (4, 6, E))
    buf = jnp.full((4, 6, K), -7, dtype)
    f = lambda x, buf: kernel_impl.fused_topk_with_score_function(x, K, topk_indices=buf)
    out = jax.vmap(f)(x, buf)
    assert_no_loop(jax.make_jaxpr(jax.vmap(f))(x, buf))
    assert_close_to_reference(out, REF_FUSED(x, topk=K, topk_indices_dtype=dtype))
    # the buffer only batched
    out = jax.vmap(f, in_axes=(None, 0))(item(x, 0), buf)
    assert_batch_equals_loop(out, lambda i: f(item(x, 0), item(buf, i)), 4)
    np.testing.assert_array_equal(np.asarray(buf), -7)  # not donated: untouched


# ---- leading dims ------------------------------------------------------------------------


@pairs(*MODE_CONFIGS[::2], ("bytemap", "softmax"))
def test_leading_dims_equal_2d(kernel_impl, mode, config):
    kw = dict(config_kwargs(config), impl=kernel_impl)
    xh = np.asarray(np_logits(11, (2, 3, 4, E)))
    flat = host(route(mode, jnp.asarray(xh.reshape(-1, E)), **kw))
    for shape in [(24,), (4, 6), (2, 3, 4), (2, 3, 4, 1), (1, 1, 24)]:
        out = host(route(mode, jnp.asarray(xh.reshape(*shape, E)), **kw))
        for o, f in zip(out, flat):
            assert o.shape == shape + f.shape[-1:]
        assert_same([o.reshape(f.shape) for o, f in zip(out, flat)], flat)
    # 1-D logits [E]: one token, outputs without a leading dim
    one = route(mode, item(xh, 0, 0, 0), **kw)
    for o, f in zip(one, flat):
        assert o.shape == f.shape[-1:]
    assert_same([np.asarray(o)[None] for o in one], [f[:1] for f in flat])
    assert_close_to_reference(one, route(mode, item(xh, 0, 0, 0), **{**kw, "impl": "ref"}))


@pytest.mark.parametrize("config", CONFIGS)
def test_leading_dims_grad(kernel_impl, config):
    kw = dict(config_kwargs(config), impl=kernel_impl)
    xh = np.asarray(np_logits(12, (2, 3, E)))
    modes = ("compact", "bitmap") if "bias" in config else ("compact_i16", "dense_i32")
    for mode in modes:
        g3 = jax.grad(loss_of(mode, **kw))(jnp.asarray(xh))
        g2 = np.asarray(jax.grad(loss_of(mode, **kw))(jnp.asarray(xh.reshape(6, E))))
        np.testing.assert_array_equal(np.asarray(g3).reshape(6, E), g2)
        g1 = jax.grad(loss_of(mode, **kw))(item(xh, 1, 2))
        assert g1.shape == (E,)
        np.testing.assert_allclose(np.asarray(g1), g2[5], rtol=1e-6, atol=1e-7)


# ---- empty batches -----------------------------------------------------------------------


def expected_shapes(mode, lead, num_experts=E, k=K):
    if mode.startswith("compact"):
        idx = jnp.int16 if mode == "compact_i16" else jnp.int32
        return [(lead + (k,), jnp.float32), (lead + (k,), idx)]
    if mode == "bytemap":
        return [(lead + (num_experts,), jnp.float32), (lead + (num_experts,), jnp.bool_)]
    if mode == "bitmap":
        return [(lead + (num_experts,), jnp.float32),
                (lead + ((num_experts + 7) // 8,), jnp.uint8)]
    idx = jnp.int16 if mode == "dense_i16" else jnp.int32
    return [(lead + (num_experts,), jnp.float32), (lead + (k,), idx)]


EMPTY_CASES = [("compact", "softmax"), ("compact", "pre_softmax"), ("compact_i16", "sigmoid_bias_groups"),
               ("bytemap", "pre_softmax"), ("bytemap", "sqrtsoftplus_bias"),
               ("bitmap", "sigmoid_bias_groups"), ("dense_i32", "pre_softmax"),
               ("dense_i16", "softmax")]


@pytest.mark.parametrize("mode,config", EMPTY_CASES, ids=["-".join(c) for c in EMPTY_CASES])
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_empty_batches(kernel_impl, mode, lead, config):
    kw = config_kwargs(config)
    x = jnp.zeros(lead + (E,), jnp.float32)
    want = expected_shapes(mode, lead)
    for out in (route(mode, x, impl=kernel_impl, **kw),
                jax.jit(lambda x: route(mode, x, impl=kernel_impl, **kw))(x),
                route(mode, x, impl="ref", **kw)):
        assert [(o.shape, o.dtype) for o in out] == [(s, jnp.dtype(d)) for s, d in want]
    g = jax.grad(loss_of(mode, impl=kernel_impl, **kw))(x)
    assert g.shape == x.shape and g.dtype == x.dtype
    g = jax.jit(jax.grad(loss_of(mode, impl=kernel_impl, **kw)))(x)
    assert g.shape == x.shape
    if lead == (2, 0):
        g = jax.vmap(jax.grad(loss_of(mode, impl=kernel_impl, **kw)))(x)
        assert g.shape == x.shape


@pytest.mark.parametrize("mode", ["dense_i32", "dense_i16"])
def test_empty_batch_with_buffer(impl, mode):
    dtype = MODES[mode]["topk_indices_dtype"]
    x = jnp.zeros((2, 0, E), jnp.bfloat16)
    buf = jnp.zeros((2, 0, K), dtype)
    probs, idx = jax.jit(lambda x, b: impl.fused_topk_with_score_function(x, K, topk_indices=b),
                         donate_argnums=1)(x, buf)
    assert probs.shape == (2, 0, E) and probs.dtype == jnp.bfloat16
    assert idx.shape == (2, 0, K) and idx.dtype == dtype


# ---- jax.export --------------------------------------------------------------------------


def roundtrip(fn, *args):
    exp = export.export(jax.jit(fn), disabled_checks=DISABLED)(*args)
    blob = exp.serialize()
    assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
    return export.deserialize(blob)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", ["pre_softmax", "sigmoid_bias_groups"])
def test_export_roundtrip(mode, config):
    kw = config_kwargs(config)
    x = np_logits(13, (3, 5, E), jnp.bfloat16)
    f = lambda x: route(mode, x, **kw)
    rt = roundtrip(f, x)
    assert "jax_router_fwd" in rt.mlir_module()
    assert_same(rt.call(x), f(x))
    # the deserialised function is a function of its input, not a constant
    y = np_logits(14, (3, 5, E), jnp.bfloat16)
    assert_same(rt.call(y), f(y))


@pytest.mark.parametrize("mode", ["compact", "bytemap", "dense_i32"])
@pytest.mark.parametrize("config", CONFIGS)
def test_export_roundtrip_grad(mode, config):
    kw = config_kwargs(config)
    x = np_logits(15, (6, E))
    g = jax.grad(loss_of(mode, **kw))
    rt = roundtrip(g, x)
    assert "jax_router_bwd" in rt.mlir_module()
    np.testing.assert_array_equal(np.asarray(rt.call(x)), np.asarray(g(x)))


def test_export_symbolic_batch():
    f = lambda x: jr.route_topk(x, K, score_function="sigmoid")
    spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, 16"), jnp.float32)
    rt = roundtrip(f, spec)
    for t in (1, 7, 18):  # symbolic dims are >= 1
        x = np_logits(16 + t, (t, E))
        assert_same(rt.call(x), f(x))


def test_export_with_indices_buffer():
    f = lambda x, buf: jr.fused_topk_with_score_function(x, K, topk_indices=buf)
    x = np_logits(17, (5, E))
    buf = jnp.full((5, K), -7, jnp.int32)
    rt = roundtrip(f, x, buf)
    assert_same(rt.call(x, buf), f(x, buf))
    np.testing.assert_array_equal(np.asarray(buf), -7)


# ---- what the compiled program runs ------------------------------------------------------

CUSTOM_CALL = re.compile(
    r"(?P<res>%\S+) = stablehlo\.custom_call @(?P<target>\w+)\((?P<args>[^)]*)\).*"
    r":\s*\((?P<arg_types>[^)]*)\)\s*->\s*(?P<result_types>.*)$",
    re.M,
)


def custom_calls(text):
    calls = []
    for m in CUSTOM_CALL.finditer(text):
        result_types = m["result_types"].strip()
        if result_types.startswith("("):
            result_types = result_types[1:-1]
        calls.append(dict(
            target=m["target"],
            args=[a.strip() for a in m["args"].split(",") if a.strip()],
            arg_types=[t.strip() for t in m["arg_types"].split(",")],
            result_types=[t.strip() for t in result_types.split(",")],
        ))
    return calls


@pytest.mark.parametrize("mode", MODES)
def test_compiled_program_runs_the_kernel(kernel_impl, mode):
    x = np_logits(18, (5, E))
    f = jax.jit(lambda x: route(mode, x, impl=kernel_impl))
    hlo = f.lower(x).compile().as_text()
    assert 'custom_call_target="jax_router_fwd"' in hlo
    ghlo = jax.jit(jax.grad(loss_of(mode, impl=kernel_impl))).lower(x).compile().as_text()
    assert 'custom_call_target="jax_router_fwd"' in ghlo
    assert 'custom_call_target="jax_router_bwd"' in ghlo


@pytest.mark.parametrize("mode", ["compact", "bitmap", "dense_i16"])
def test_xla_implementation_has_no_custom_call(mode):
    x = np_logits(19, (5, E))
    f = jax.jit(lambda x: route(mode, x, implementation="xla"))
    assert "custom_call" not in f.lower(x).as_text()
    g = jax.jit(jax.grad(loss_of(mode, implementation="xla")))
    assert "custom_call" not in g.lower(x).as_text()
    assert_close_to_reference(f(x), route(mode, x, impl="ref"))


@pytest.mark.parametrize("config", CONFIGS)
def test_compact_grad_saves_compact_residuals(kernel_impl, config):
    T = 6
    kw = dict(config_kwargs(config), impl=kernel_impl)
    x = np_logits(20, (T, E))
    text = jax.jit(jax.grad(loss_of("compact", **kw))).lower(x).as_text()
    calls = custom_calls(text)
    assert [c["target"] for c in calls] == ["jax_router_fwd", "jax_router_bwd"], calls
    fwd, bwd = calls
    te = f"tensor<{T}x{E}x"
    # The forward of route_topk writes nothing [T, E].
    assert not any(t.startswith(te) for t in fwd["result_types"]), fwd
    # Backward operands: (cotangent [T,k], indices [T,k], act f32[T,k], logits or empty)
    assert bwd["arg_types"][:3] == [f"tensor<{T}x{K}xf32>", f"tensor<{T}x{K}xi32>",
                                    f"tensor<{T}x{K}xf32>"], bwd
    if CONFIGS[config].get("use_pre_softmax"):
        # pre-softmax recomputes its row from the logits themselves, not from a saved copy
        assert bwd["arg_types"][3] == f"tensor<{T}x{E}xf32>"
        assert bwd["args"][3] == "%arg0", bwd
    else:
        assert bwd["arg_types"][3] == "tensor<0xf32>", bwd
    assert bwd["result_types"] == [f"tensor<{T}x{E}xf32>"]
    # No [T, E] float tensor is built anywhere in the program but the gradient itself: the
    # only operations that mention one are the two custom calls (logits in, grad_logits out).
    mentions = [line.strip() for line in text.splitlines()
                if re.match(r"^\s*%\S+ = ", line) and re.search(rf"{te}(f32|bf16|f16)>", line)]
    assert len(mentions) == 2, mentions
    assert all("stablehlo.custom_call @jax_router_" in m for m in mentions), mentions


@pytest.mark.parametrize("mode", ["dense_i32", "dense_i16"])
def test_dense_mode_writes_no_map(kernel_impl, mode):
    T = 6
    x = np_logits(21, (T, E))
    text = jax.jit(lambda x: route(mode, x, impl=kernel_impl)).lower(x).as_text()
    (fwd,) = custom_calls(text)
    # results: probs [T,E], map (empty), weights (empty), indices [T,k], act (empty)
    assert fwd["result_types"][0] == f"tensor<{T}x{E}xf32>"
    assert fwd["result_types"][1].startswith("tensor<0x")
    idx = "i32" if mode == "dense_i32" else "i16"
    assert fwd["result_types"][3] == f"tensor<{T}x{K}x{idx}>"
    assert not any(re.match(rf"tensor<{T}x{E}x(i1|ui8)>", t) for t in fwd["result_types"])


def test_bitmap_mode_writes_packed_map(kernel_impl):
    T = 6
    x = np_logits(22, (T, 20))
    text = jax.jit(lambda x: kernel_impl.fused_topk_with_score_function(
        x, K, routing_map_format="bitmap_u8")).lower(x).as_text()
    (fwd,) = custom_calls(text)
    assert fwd["result_types"][1] == f"tensor<{T}x3xui8>"
    assert not any(t == f"tensor<{T}x20xi1>" for t in fwd["result_types"])


# ---- aliasing / donation of topk_indices -------------------------------------------------


def poisoned(shape, dtype, value=-7):
    return jnp.full(shape, value, dtype)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int16])
@pytest.mark.parametrize("config", ["softmax", "sigmoid_bias_groups"])
def test_donated_buffer_is_reused(kernel_impl, dtype, config):
    kw = dict(config_kwargs(config), impl=kernel_impl)
    x = np_logits(23, (2, 5, E))
    plain = route("bytemap", x, topk_indices_dtype=dtype, **kw)
    f = jax.jit(lambda x, buf: route("bytemap", x, topk_indices=buf, **kw), donate_argnums=1)
    hlo = f.lower(x, poisoned((2, 5, K), dtype)).compile().as_text()
    # the custom call writes its indices output (tuple index 3) into operand 2, the buffer ...
    assert re.search(r'custom_call_target="jax_router_fwd".*output_to_operand_aliasing=\{\{3\}: \(2, \{\}\)\}',
                     hlo), hlo
    # ... and the program's second output lives in its second parameter's memory
    assert re.search(r"input_output_alias=\{ \{1\}: \(1, \{\}", hlo), hlo
    buf = poisoned((2, 5, K), dtype)
    out = f(x, buf)
    assert buf.is_deleted()
    assert_same(out, plain)
    assert_close_to_reference(out, route("bytemap", x, topk_indices_dtype=dtype,
                                         **{**kw, "impl": "ref"}))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int16])
@pytest.mark.parametrize("value", [-7, 0, 2**15 - 1], ids=str)
def test_buffer_contents_never_leak(kernel_impl, dtype, value):
    x = np_logits(24, (9, E))
    want = reference.fused_topk_with_score_function(x, K, topk_indices_dtype=dtype)
    # eager, jit without donation, jit with donation
    buf = poisoned((9, K), dtype, value)
    assert_close_to_reference(kernel_impl.fused_topk_with_score_function(x, K, topk_indices=buf),
                              want)
    np.testing.assert_array_equal(np.asarray(buf), value)  # not donated: left as it was
    f = jax.jit(lambda x, b: kernel_impl.fused_topk_with_score_function(x, K, topk_indices=b))
    assert_close_to_reference(f(x, buf), want)
    np.testing.assert_array_equal(np.asarray(buf), value)
    fd = jax.jit(lambda x, b: kernel_impl.fused_topk_with_score_function(x, K, topk_indices=b),
                 donate_argnums=1)
    for seed in range(3):
        y = np_logits(25 + seed, (9, E))
        b = poisoned((9, K), dtype, value)
        assert_close_to_reference(fd(y, b), reference.fused_topk_with_score_function(
            y, K, topk_indices_dtype=dtype))
        assert b.is_deleted()


def test_buffer_with_valid_looking_stale_indices(kernel_impl):
    """A buffer holding a previous step's (valid) indices is fully overwritten."""
    x1, x2 = np_logits(30, (8, E)), np_logits(31, (8, E))
    f = jax.jit(lambda x, b: kernel_impl.fused_topk_with_score_function(x, K, topk_indices=b),
                donate_argnums=1)
    _, idx1 = f(x1, jnp.zeros((8, K), jnp.int32))
    idx1_copy = np.asarray(idx1).copy()
    _, idx2 = f(x2, idx1)
    assert idx1.is_deleted()
    np.testing.assert_array_equal(np.asarray(idx2), np.asarray(
        reference.route_topk(x2, K)[1]))
    assert not np.array_equal(np.asarray(idx2), idx1_copy)


def test_donated_buffer_grad(impl):
    x = np_logits(32, (6, E))

    def loss(x, buf):
        probs, idx = impl.fused_topk_with_score_function(x, K, score_function="sigmoid",
                                                         topk_indices=buf)
        return jnp.sum(probs * jnp.arange(E)), idx

    g = jax.jit(jax.grad(loss, has_aux=True), donate_argnums=1)
    buf = poisoned((6, K), jnp.int32)
    gx, idx = g(x, buf)
    gx_ref = jax.jit(jax.grad(lambda x: jnp.sum(REF_FUSED(
        x, topk=K, score_function="sigmoid")[0] * jnp.arange(E))))(x)
    idx_ref = REF_COMPACT(x, topk=K, score_function="sigmoid")[1]
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx_ref))
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=1e-5, atol=1e-6)


# ---- scan over layers, rematerialisation -------------------------------------------------


@pytest.mark.parametrize("config", ["pre_softmax", "sigmoid_bias_groups"])
def test_scan_and_checkpoint(kernel_impl, config):
    """A router inside lax.scan (one per layer) and under jax.checkpoint: same values and
    gradients as an unrolled Python loop."""
    kw = dict(config_kwargs(config), impl=kernel_impl)
    xs = np_logits(40, (3, 5, E))

    def layer(x):
        w, i = route("compact", x, **kw)
        p, m = route("bitmap", x, **kw)
        return jnp.sum(w * jnp.arange(1.0, K + 1)) + jnp.sum(p * jnp.cos(jnp.arange(E) * 1.0))

    def scanned(xs):
        return jax.lax.scan(lambda c, x: (c + layer(x), None), 0.0, xs)[0]

    def unrolled(xs):
        return sum(layer(xs[i]) for i in range(xs.shape[0]))

    jaxpr = str(jax.make_jaxpr(jax.grad(scanned))(xs))
    assert "jax_router_fwd" in jaxpr and "jax_router_bwd" in jaxpr
    g_loop = np.asarray(jax.jit(jax.grad(unrolled))(xs))
    for g in (jax.jit(jax.grad(scanned))(xs), jax.jit(jax.grad(jax.checkpoint(unrolled)))(xs),
              jax.jit(jax.grad(lambda xs: jax.lax.scan(
                  lambda c, x: (c + jax.checkpoint(layer)(x), None), 0.0, xs)[0]))(xs)):
        np.testing.assert_array_equal(np.asarray(g), g_loop)
    np.testing.assert_allclose(float(jax.jit(scanned)(xs)), float(jax.jit(unrolled)(xs)),
                               rtol=1e-6)


def test_export_loads_in_a_fresh_process(tmp_path):
    """Serialised in this process, deserialised and run in another that only imports
    jax_router (the FFI targets are registered on import)."""

    kw = config_kwargs("sigmoid_bias_groups")
    bias = kw.pop("bias")
    f = lambda x, b: (route("compact", x, bias=b, **kw),
                      jax.grad(lambda x: route("bytemap", x, bias=b, **kw)[0].sum())(x))
    x = np_logits(41, (6, E))
    exp = export.export(jax.jit(f), disabled_checks=DISABLED)(x, bias)
    (tmp_path / "f.bin").write_bytes(exp.serialize())
    np.save(tmp_path / "x.npy", np.asarray(x))
    np.save(tmp_path / "b.npy", np.asarray(bias))
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import jax
        from jax import export
        import jax_router  # noqa: F401  (registers the FFI targets)
        d = sys.argv[1]
        fn = export.deserialize(open(d + "/f.bin", "rb").read())
        (w, i), g = fn.call(np.load(d + "/x.npy"), np.load(d + "/b.npy"))
        np.save(d + "/w.npy", np.asarray(w)); np.save(d + "/i.npy", np.asarray(i))
        np.save(d + "/g.npy", np.asarray(g))
    """)
    # the exported program is for this backend: the child runs on the same platform
    platform = "cuda" if jax.default_backend() == "gpu" else jax.default_backend()
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120,
                   env={**os.environ, "JAX_PLATFORMS": platform})
    (w, i), g = f(x, bias)
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), np.asarray(w))
    np.testing.assert_array_equal(np.load(tmp_path / "i.npy"), np.asarray(i))
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), np.asarray(g))


# ---- sharded tokens ----------------------------------------------------------------------


def test_token_sharded_logits_are_not_gathered():
    from jax.sharding import NamedSharding, PartitionSpec as P

    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (conftest asks for 8 host devices)")
    mesh = jax.make_mesh((4,), ("data",))
    x = np_logits(50, (16, E))
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    f = jax.jit(lambda x: route("compact", x, score_function="sigmoid"))
    # correct either way
    assert_same(f(xs), f(x))
    hlo = f.lower(xs).compile().as_text()
    assert 'custom_call_target="jax_router_fwd"' in hlo
    assert "all-gather" not in hlo, "the token dim is gathered before the router"
