"""Autodiff modes: the kernels are reverse-mode only (jax.custom_vjp). Forward mode and second
order raise an error that says so and names the way out (implementation="xla", pure JAX, which
supports every mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr
from jax_router import _ffi

from .util import random_bias, random_logits

E, K = 16, 4
X = random_logits(0, (5, E))
BIAS = random_bias(0, E)

# Scalar functions of the logits through each kernel pair.
OPS = {
    "route_topk": lambda x, impl: jnp.sum(jr.route_topk(
        x, K, score_function="sigmoid", expert_bias=BIAS, implementation=impl)[0] ** 2),
    "fused_topk": lambda x, impl: jnp.sum(jr.fused_topk_with_score_function(
        x, K, use_pre_softmax=True, implementation=impl)[0] ** 2),
    "aux_scores": lambda x, impl: jnp.sum(jr.fused_compute_score_for_moe_aux_loss(
        x, K, "sqrtsoftplus", implementation=impl)[1] ** 2),
}

needs_kernels = pytest.mark.skipif(not _ffi.default_backend_has_kernels(),
                                   reason="the limits are the kernels'")

FORWARD_MODE = {
    "jvp": lambda f: jax.jvp(f, (X,), (X,)),
    "jacfwd": lambda f: jax.jacfwd(f)(X),
}
SECOND_ORDER = {
    "grad_of_grad": lambda f: jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))(X),
    "hessian": lambda f: jax.hessian(f)(X),
    "grad_of_vjp": lambda f: jax.grad(
        lambda x: jnp.sum(jax.vjp(f, x)[1](jnp.float32(1.0))[0] ** 2))(X),
}


@needs_kernels
@pytest.mark.parametrize("mode", FORWARD_MODE)
@pytest.mark.parametrize("op", OPS)
def test_forward_mode_raises_a_clear_error(op, mode):
    f = lambda x: OPS[op](x, "ffi")
    with pytest.raises(TypeError, match="jax_router: forward-mode autodiff is not supported.*"
                                        "implementation='xla'"):
        FORWARD_MODE[mode](f)


@needs_kernels
@pytest.mark.parametrize("mode", SECOND_ORDER)
@pytest.mark.parametrize("op", OPS)
def test_second_order_raises_a_clear_error(op, mode):
    f = lambda x: OPS[op](x, "ffi")
    with pytest.raises(NotImplementedError, match="jax_router: second-order autodiff is not "
                                                  "supported.*implementation='xla'"):
        SECOND_ORDER[mode](f)


@pytest.mark.parametrize("op", OPS)
def test_reverse_mode_is_supported(op):
    f = lambda x: OPS[op](x, None)
    g = jax.grad(f)(X)
    want = jax.grad(lambda x: OPS[op](x, "xla"))(X)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-4, atol=1e-6)
    jac = jax.jacrev(f)(X)
    np.testing.assert_allclose(np.asarray(jac), np.asarray(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", {**FORWARD_MODE, **SECOND_ORDER})
@pytest.mark.parametrize("op", OPS)
def test_pure_jax_path_supports_every_mode(op, mode):
    f = lambda x: OPS[op](x, "xla")
    {**FORWARD_MODE, **SECOND_ORDER}[mode](f)


@pytest.mark.parametrize("op", OPS)
def test_forward_mode_of_pure_jax_path_matches_reverse(op):
    f = lambda x: OPS[op](x, "xla")
    _, tangent = jax.jvp(f, (X,), (X,))
    np.testing.assert_allclose(float(tangent), float(jnp.vdot(jax.grad(f)(X), X)), rtol=1e-4)
