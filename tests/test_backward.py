"""Backward pass: the fused backward against JAX autodiff of the reference and finite
differences, on each kernel implementation (`kernel_impl`: the pure-JAX implementation's gradient
is the reference's autodiff itself); the gradient properties that hold for every implementation
run on each (`impl`)."""

from __future__ import annotations

import io
import contextlib

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_router as jr

from .util import FLOAT_DTYPES, SCORE_CONFIGS, SCORE_IDS, random_bias, random_logits

MODES = ["compact", "dense", "bytemap", "bitmap"]


def _np_scores(x, kw):
    """Selection scores z of one row, in numpy (docs/semantics.md#forward-selection-score)."""
    fn = jr.options.score_function_of(kw.get("score_function", "softmax"))
    if fn == jr.ScoreFunction.SOFTMAX:
        if kw.get("use_pre_softmax"):
            e = np.exp(x - x.max())
            return e / e.sum()
        return x
    s = 1 / (1 + np.exp(-x)) if fn == jr.ScoreFunction.SIGMOID else np.sqrt(np.log1p(np.exp(x)))
    bias = kw.get("expert_bias")
    return s + (np.asarray(bias, np.float64) if bias is not None else 0.0)


def separated_logits(seed, shape, kw=None, margin=2e-3, num_groups=4, group_m=2):
    """Random logits whose selection scores and group scores are at least ``margin`` apart
    (relative to the row's largest score), so that finite differences never flip a choice."""
    kw = kw or {}
    E = shape[-1]
    rows = int(np.prod(shape[:-1]))
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < rows:
        x = 2.0 * rng.normal(size=E)
        z = _np_scores(x, kw)
        tol = margin * np.abs(z).max()
        if E > 1 and np.diff(np.sort(z)).min() < tol:
            continue
        if E % num_groups == 0:
            g = np.sort(z.reshape(num_groups, -1), axis=1)[:, -group_m:].sum(1)
            if np.diff(np.sort(g)).min() < tol:
                continue
        out.append(x)
    return jnp.asarray(np.stack(out).reshape(shape), jnp.float32)


def loss_fn(mode, topk, kw, implementation, cot):
    """A scalar loss of the router's differentiable output, weighted by a random cotangent
    (``implementation``: "ffi" or "xla", the public functions' argument)."""

    def f(logits):
        if mode == "compact":
            w, _ = jr.route_topk(logits, topk, implementation=implementation, **kw)
            return jnp.sum(w * cot[..., :topk])
        extra = {"dense": dict(topk_indices_dtype=jnp.int32),
                 "bitmap": dict(routing_map_format="bitmap_u8")}.get(mode, {})
        probs, _ = jr.fused_topk_with_score_function(logits, topk, implementation=implementation,
                                                     **extra, **kw)
        return jnp.sum(probs.astype(jnp.float32) * cot)

    return f


def _kw(score, pre, bias, groups, E, seed):
    kw = dict(score_function=score, use_pre_softmax=pre, scaling_factor=1.7)
    if bias:
        kw["expert_bias"] = random_bias(seed, E)
    if groups:
        kw["num_groups"], kw["group_topk"] = 4, 2
    return kw


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("groups", [False, True], ids=["nogroups", "groups"])
@pytest.mark.parametrize("score,pre,bias", SCORE_CONFIGS, ids=SCORE_IDS)
def test_grad_matches_reference_and_finite_differences(kernel_impl, score, pre, bias, groups,
                                                       mode):
    E, topk, T = 16, 4, 6
    kw = _kw(score, pre, bias, groups, E, 7)
    logits = separated_logits(E + T, (T, E), kw)
    cot = random_logits(11, (T, E), jnp.float32)
    f = loss_fn(mode, topk, kw, kernel_impl.implementation, cot)
    f_ref = loss_fn(mode, topk, kw, "xla", cot)
    g = jax.jit(jax.grad(f))(logits)
    g_ref = jax.jit(jax.grad(f_ref))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=2e-5, atol=2e-6)
    check_grads(f, (logits,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-4)


@pytest.mark.parametrize("topk", [1, 3, 16])
@pytest.mark.parametrize("score,pre,bias", SCORE_CONFIGS, ids=SCORE_IDS)
def test_grad_topk_edge_cases(kernel_impl, score, pre, bias, topk):
    E, T = 16, 5
    logits = random_logits(topk, (T, E), jnp.float32)
    kw = _kw(score, pre, bias, False, E, 3)
    cot = random_logits(12, (T, E), jnp.float32)
    for mode in ("compact", "dense"):
        g = jax.grad(loss_fn(mode, topk, kw, kernel_impl.implementation, cot))(logits)
        g_ref = jax.grad(loss_fn(mode, topk, kw, "xla", cot))(logits)
        np.testing.assert_allclose(g, g_ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("score,pre,bias", SCORE_CONFIGS, ids=SCORE_IDS)
def test_grad_dtypes_and_leading_dims(kernel_impl, score, pre, bias, dtype):
    E, topk = 32, 8
    kw = _kw(score, pre, bias, True, E, 5)
    logits = separated_logits(5, (2, 3, E), kw).astype(dtype)
    cot = random_logits(13, (2, 3, E), jnp.float32)
    for mode in ("compact", "dense"):
        g = jax.grad(loss_fn(mode, topk, kw, kernel_impl.implementation, cot))(logits)
        g_ref = jax.grad(loss_fn(mode, topk, kw, "xla", cot))(logits)
        assert g.dtype == dtype and g.shape == logits.shape
        tol = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}[dtype]
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                                   rtol=tol, atol=tol * 0.1)


def test_expert_bias_gets_zero_gradient(kernel_impl):
    E = 16
    logits = random_logits(1, (4, E), jnp.float32)
    bias = random_bias(1, E)

    def f(logits, bias):
        w, _ = kernel_impl.route_topk(logits, 4, score_function="sigmoid", expert_bias=bias)
        probs, _ = kernel_impl.fused_topk_with_score_function(
            logits, 4, score_function="sigmoid", expert_bias=bias)
        cot = random_logits(2, (4, E), jnp.float32)
        return jnp.sum(w * cot[:, :4]) + jnp.sum(probs * cot)

    g_logits, g_bias = jax.grad(f, argnums=(0, 1))(logits, bias)
    assert g_bias.shape == bias.shape
    np.testing.assert_array_equal(g_bias, np.zeros(E, np.float32))
    assert np.abs(np.asarray(g_logits)).sum() > 0


def test_softmax_pre_gradient_reaches_unselected_experts(impl):
    E, topk = 12, 3
    logits = separated_logits(2, (3, E))
    w_idx = np.asarray(impl.route_topk(logits, topk, use_pre_softmax=True)[1])
    g = np.asarray(jax.grad(lambda x: jnp.sum(
        impl.route_topk(x, topk, use_pre_softmax=True)[0]))(logits))
    unselected = np.ones((3, E), bool)
    np.put_along_axis(unselected, w_idx, False, axis=-1)
    assert (g[unselected] != 0).all()
    g2 = np.asarray(jax.grad(lambda x: jnp.sum(
        impl.route_topk(x, topk)[0] ** 2))(logits))
    assert (g2[unselected] == 0).all()


def _saved_residuals(f, x):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(f, x)
    return buf.getvalue()


@pytest.mark.parametrize("score,pre", [("sigmoid", False), ("softmax", False),
                                       ("sqrtsoftplus", False), ("softmax", True)])
def test_residuals_are_compact(kernel_impl, score, pre):
    """The kernels' custom_vjp saves compact residuals (pure JAX autodiff need not)."""
    T, E, topk = 40, 64, 4
    logits = random_logits(3, (T, E), jnp.float32)

    def f(x):
        return jnp.sum(kernel_impl.route_topk(x, topk, score_function=score,
                                              use_pre_softmax=pre)[0])

    saved = _saved_residuals(f, logits)
    assert f"[{T},{topk}]" in saved
    lines = [ln for ln in saved.splitlines() if f"[{T},{E}]" in ln]
    if pre:  # softmax-pre recomputes its row from the logits argument itself
        assert all("argument" in ln for ln in lines), saved
    else:
        assert not lines, saved


def test_grad_of_empty_batch(impl):
    logits = jnp.zeros((0, 16), jnp.float32)
    for mode in MODES:
        g = jax.grad(loss_fn(mode, 4, dict(score_function="sigmoid"), impl.implementation,
                             jnp.ones((0, 16))))(logits)
        assert g.shape == (0, 16)


def test_vmap_of_grad(kernel_impl):
    E, topk = 16, 4
    logits = separated_logits(4, (3, 5, E))
    kw = dict(score_function="sigmoid", expert_bias=random_bias(2, E))
    f = lambda x: jnp.sum(kernel_impl.route_topk(x, topk, **kw)[0] ** 2)
    g = jax.vmap(jax.grad(f))(logits)
    g_loop = jnp.stack([jax.grad(f)(logits[i]) for i in range(3)])
    np.testing.assert_allclose(g, g_loop, rtol=1e-6, atol=1e-7)
