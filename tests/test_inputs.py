"""What a JAX user passes: array-likes follow jnp.asarray's rules on the eager and the jit path
alike; flags must be bools, numbers numbers, and static options static."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr
from jax_router import reference

E, K = 16, 4
RNG = np.random.default_rng(0)
LOGITS64 = RNG.standard_normal((6, E))  # float64, what np.random gives
BIAS64 = RNG.standard_normal(E) * 0.1


def _eager_and_jit(fn, *args):
    """fn(*args) eagerly and under jax.jit with the same (numpy) arguments."""
    return fn(*args), jax.jit(fn)(*args)


ROUTERS = {
    "route_topk": lambda x, b: jr.route_topk(x, K, score_function="sigmoid", expert_bias=b),
    "fused_topk": lambda x, b: jr.fused_topk_with_score_function(
        x, K, score_function="sigmoid", expert_bias=b),
    "dense": lambda x, b: jr.fused_topk_with_score_function(
        x, K, score_function="sigmoid", expert_bias=b, topk_indices_dtype=jnp.int32),
    "aux_scores": lambda x, b: jr.fused_compute_score_for_moe_aux_loss(x, K, "sigmoid"),
    "compute_aux_scores": lambda x, b: jr.fused_topk_with_score_function(
        x, K, score_function="sigmoid", compute_aux_scores=True),
}


@pytest.mark.parametrize("name", ROUTERS)
def test_numpy_float64_is_float32_eager_and_jit(name):
    fn = ROUTERS[name]
    eager, jitted = _eager_and_jit(fn, LOGITS64, BIAS64)
    want = fn(jnp.asarray(LOGITS64, jnp.float32), jnp.asarray(BIAS64, jnp.float32))
    for e, j, w in zip(eager, jitted, want):
        assert e.dtype == j.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(e), np.asarray(w))
        np.testing.assert_array_equal(np.asarray(j), np.asarray(w))


@pytest.mark.parametrize("name", ROUTERS)
def test_python_lists(name):
    fn = ROUTERS[name]
    got = fn(LOGITS64.tolist(), BIAS64.tolist())
    want = fn(jnp.asarray(LOGITS64, jnp.float32), jnp.asarray(BIAS64, jnp.float32))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_integer_list_logits_are_refused_by_dtype():
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16, got dtype int32"):
        jr.route_topk([[1, 2, 3, 4]], 2)


@pytest.mark.parametrize("bad", ["abc", object(), [[1.0], [1.0, 2.0]]], ids=["str", "obj", "ragged"])
def test_non_array_logits_name_the_argument(bad):
    with pytest.raises(TypeError, match="logits must be an array of float32"):
        jr.route_topk(bad, 1)


def test_numpy_int64_index_buffer():
    buf = np.zeros((6, K), np.int64)  # int32 once converted, as under jit with x64 off
    probs, idx = jr.fused_topk_with_score_function(LOGITS64, K, topk_indices=buf)
    assert idx.dtype == jnp.int32
    _, jit_idx = jax.jit(lambda x, b: jr.fused_topk_with_score_function(x, K, topk_indices=b))(
        LOGITS64, buf)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(jit_idx))


def test_aux_loss_numpy_and_lists():
    probs = np.asarray(jax.nn.softmax(jnp.asarray(LOGITS64, jnp.float32)), np.float64)
    tpe = np.arange(E, dtype=np.int64)
    want = jr.fused_moe_aux_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(tpe, jnp.int32),
                                 6, E, K, 0.1)
    for p, t in ((probs, tpe), (probs.tolist(), tpe.tolist())):
        eager = jr.fused_moe_aux_loss(p, t, 6, E, K, 0.1)
        assert eager.dtype == jnp.float32
        np.testing.assert_allclose(float(eager), float(want), rtol=1e-6)
    jitted = jax.jit(lambda p, t: jr.fused_moe_aux_loss(p, t, 6, E, K, 0.1))(probs, tpe)
    np.testing.assert_allclose(float(jitted), float(want), rtol=1e-6)


def test_float64_with_x64_is_refused_on_both_paths():
    """With 64-bit types on, jnp keeps float64, and so the dtype rule refuses it either way."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        for call in (lambda: jr.route_topk(LOGITS64, K),
                     lambda: jax.jit(lambda x: jr.route_topk(x, K))(LOGITS64)):
            with pytest.raises(TypeError, match="got dtype float64"):
                call()
    finally:
        jax.config.update("jax_enable_x64", previous)


# ---- flags and numbers ---------------------------------------------------------------------

FNS = [jr.route_topk, jr.fused_topk_with_score_function, reference.route_topk,
       reference.fused_topk_with_score_function]
X = jnp.asarray(LOGITS64, jnp.float32)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("flag", ["no", "False", 1, 0, None, jnp.bool_(True), np.array(True)],
                         ids=repr)
def test_use_pre_softmax_must_be_a_bool(fn, flag):
    with pytest.raises(TypeError, match="use_pre_softmax must be a bool"):
        fn(X, K, use_pre_softmax=flag)


@pytest.mark.parametrize("fn", FNS)
def test_use_pre_softmax_numpy_bool(fn):
    got = fn(X, K, use_pre_softmax=np.bool_(True))
    want = fn(X, K, use_pre_softmax=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("scale", ["2.5", b"2", True, np.bool_(False), jnp.float32(2.5),
                                   np.array([2.5])], ids=repr)
def test_scaling_factor_must_be_a_number(fn, scale):
    with pytest.raises(TypeError, match="scaling_factor must be a number"):
        fn(X, K, scaling_factor=scale)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("scale", [2, 2.5, np.float32(2.5), np.int64(3), np.float16(0.5)],
                         ids=repr)
def test_scaling_factor_numbers(fn, scale):
    w = jr.route_topk(X, K, scaling_factor=scale)[0]
    np.testing.assert_allclose(np.asarray(w.sum(-1)), float(scale), rtol=1e-5)
    fn(X, K, scaling_factor=scale)


def test_compute_aux_scores_must_be_a_bool():
    with pytest.raises(TypeError, match="compute_aux_scores must be a bool"):
        jr.fused_topk_with_score_function(X, K, compute_aux_scores="yes")


# ---- static options passed as traced values ------------------------------------------------

TRACED = [
    ("topk", lambda x, v: jr.route_topk(x, v), K),
    ("scaling_factor", lambda x, v: jr.route_topk(x, K, scaling_factor=v), 2.5),
    ("num_groups", lambda x, v: jr.route_topk(x, K, num_groups=v, group_topk=2), 4),
    ("group_topk", lambda x, v: jr.route_topk(x, K, num_groups=4, group_topk=v), 2),
    ("use_pre_softmax", lambda x, v: jr.route_topk(x, K, use_pre_softmax=v), True),
    ("topk", lambda x, v: jr.fused_topk_with_score_function(x, v), K),
    ("topk", lambda x, v: jr.fused_compute_score_for_moe_aux_loss(x, v, "softmax"), K),
    ("topk", lambda x, v: reference.route_topk(x, v), K),
]


@pytest.mark.parametrize("argname,fn,value", TRACED,
                         ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(TRACED)])
def test_traced_static_option_says_it_must_be_static(argname, fn, value):
    with pytest.raises(TypeError, match=f"{argname} must be a static Python .*not a traced "
                                        "value.*static_argnums"):
        jax.jit(fn)(X, value)
    # ... and as a static argument it works
    jax.jit(fn, static_argnums=1)(X, value)


@pytest.mark.parametrize("argname", ["num_experts", "topk"])
def test_aux_loss_traced_static_options(argname):
    probs = jax.nn.softmax(X)
    tpe = jnp.ones((E,), jnp.int32)
    args = dict(num_experts=E, topk=K)

    def loss(p, v):
        return jr.fused_moe_aux_loss(p, tpe, 6, **{**args, argname: v}, coeff=0.1)

    with pytest.raises(TypeError, match=f"{argname} must be a static Python int"):
        jax.jit(loss)(probs, args[argname])
    jax.jit(functools.partial(loss, v=args[argname]))(probs)
