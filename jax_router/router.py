"""The fused router: public functions, their ``custom_vjp`` and the FFI calls.

Path to the kernel: ``route_topk`` / ``fused_topk_with_score_function`` validate (options.py),
then ``_route`` (a ``jax.custom_vjp``) calls the ``jax_router_fwd`` custom call (through
sharding.py, which partitions it row-wise over token-sharded inputs), which runs ``FwdCpu`` in
ffi/router_cpu.cc or ``FwdCuda`` in ffi/router_cuda.cu; the backward calls ``jax_router_bwd``
with the compact residuals (selected indices and their scores).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from . import _ffi, reference, sharding
from .options import (
    RouteOptions,
    RoutingMapFormat,
    index_dtype_of,
    make_options,
    routing_map_format_of,
)

_COMPACT, _MAP, _DENSE = "compact", "map", "dense"


@dataclasses.dataclass(frozen=True)
class _Call:
    """Everything static about one routing call (the custom_vjp's non-differentiable arg)."""

    opts: RouteOptions
    mode: str  # _COMPACT: (weights, indices); _MAP: (probs, map); _DENSE: (probs, indices)
    bitmap: bool
    index_dtype: Any  # np.dtype of the indices output (compact / dense)
    logits_dtype: Any


def _aval(ref: jax.Array, shape: tuple[int, ...], dtype: Any) -> Any:
    """Output type derived from ``ref``'s type: same leading-dim sharding, last dim whole.

    Built from ``jax.typeof`` rather than a bare ShapeDtypeStruct so that sharding and
    varying-manual-axes information carries through shard_map and explicit meshes.
    """
    t = jax.typeof(ref)
    spec = tuple(t.sharding.spec) + (None,) * (t.ndim - len(t.sharding.spec))
    new = spec[:-1] + (None,) if len(shape) == t.ndim else (None,) * len(shape)
    return t.update(shape=tuple(shape), dtype=dtype, sharding=t.sharding.update(spec=P(*new)))


def _empty(ref: jax.Array, dtype: Any) -> Any:
    """A zero-size output: the handler skips outputs it was not asked for."""
    return _aval(ref, (0,), dtype)


def _forward(call: _Call, logits, bias, alias, residuals: bool):
    """One jax_router_fwd call; returns (probs, map, weights, indices, act), unused ones empty."""
    opts = call.opts
    lead, E, k = logits.shape[:-1], opts.num_experts, opts.topk
    want_probs = call.mode in (_MAP, _DENSE)
    want_idx = call.mode in (_COMPACT, _DENSE) or residuals
    idx_dtype = call.index_dtype if call.index_dtype is not None else jnp.int32
    map_shape = lead + (((E + 7) // 8) if call.bitmap else E,)
    out_types = (
        _aval(logits, lead + (E,), logits.dtype) if want_probs else _empty(logits, logits.dtype),
        _aval(logits, map_shape, jnp.uint8 if call.bitmap else jnp.bool_)
        if call.mode == _MAP
        else _empty(logits, jnp.bool_),
        _aval(logits, lead + (k,), jnp.float32) if call.mode == _COMPACT
        else _empty(logits, jnp.float32),
        _aval(logits, lead + (k,), idx_dtype) if want_idx else _empty(logits, idx_dtype),
        _aval(logits, lead + (k,), jnp.float32) if residuals else _empty(logits, jnp.float32),
    )
    bias_arg = bias.astype(jnp.float32) if bias is not None else jnp.zeros((0,), jnp.float32)
    return sharding.ffi_forward(out_types, logits, bias_arg, alias,
                                opts.ffi_attrs(bitmap=call.bitmap))


def _backward(call: _Call, g, idx, act, logits):
    opts = call.opts
    shape = act.shape[:-1] + (opts.num_experts,)
    lg = logits if opts.pre_softmax else jnp.zeros((0,), jnp.float32)
    return sharding.ffi_backward(_aval(act, shape, call.logits_dtype), g, idx, act, lg,
                                 opts.ffi_attrs(dense_grad=call.mode != _COMPACT))


def _primal(call: _Call, outs):
    probs, routing_map, weights, indices, _ = outs
    if call.mode == _COMPACT:
        return weights, indices
    return (probs, routing_map) if call.mode == _MAP else (probs, indices)


def _route_impl(call, logits, bias, alias):
    return _primal(call, _forward(call, logits, bias, alias, residuals=False))


def _route_fwd(call, logits, bias, alias):
    outs = _forward(call, logits, bias, alias, residuals=True)
    residuals = (outs[3], outs[4], logits if call.opts.pre_softmax else None, bias)
    return _primal(call, outs), residuals


def _route_bwd(call, residuals, cotangents):
    idx, act, logits, bias = residuals
    grad_logits = _backward(call, cotangents[0], idx, act, logits)
    return grad_logits, None if bias is None else jnp.zeros_like(bias), None


_route = jax.custom_vjp(_route_impl, nondiff_argnums=(0,))
_route.defvjp(_route_fwd, _route_bwd)


def _use_kernels(implementation: str | None) -> bool:
    return _ffi.use_kernels(implementation, (_ffi.FWD_TARGET, _ffi.BWD_TARGET), "its kernels")


def fused_topk_with_score_function(
    logits: jax.Array,
    topk: int,
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    scaling_factor: float | None = None,
    score_function: Any = "softmax",
    expert_bias: jax.Array | None = None,
    routing_map_format: Any = "bytemap",
    topk_indices: jax.Array | None = None,
    topk_indices_dtype: Any = None,
    *,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fused MoE routing with TransformerEngine's signature; returns ``(probs, routing_output)``.

    Args:
      logits: ``[*lead, E]`` float32 / bfloat16 / float16 router logits.
      topk: experts per token, ``1 <= topk <= E``.
      use_pre_softmax: softmax over all E before selection (softmax only).
      num_groups, group_topk: group-limited routing (both None or -1: off).
      scaling_factor: multiplier on the final weights (None: 1.0).
      score_function: "softmax" | "sigmoid" | "sqrtsoftplus" (or an enum with that name).
      expert_bias: ``[E]`` float bias added to the selection score only (sigmoid /
        sqrtsoftplus); it never changes the weights and gets a zero gradient.
      routing_map_format: "bytemap" (``bool[*lead, E]``) or "bitmap_u8"
        (``uint8[*lead, ceil(E/8)]``, bit ``e % 8`` of byte ``e // 8``).
      topk_indices: optional ``[*lead, topk]`` int16/int32/int64 buffer; requests dense indices
        and is aliased to that output (donate it under jit to reuse its memory).
      topk_indices_dtype: requests dense indices of this dtype without a buffer.
      implementation: None (kernels where this backend has them, else pure JAX), "ffi", "xla".

    Returns:
      ``probs [*lead, E]`` in the logits dtype (``scaling_factor * p`` on the selected experts,
      zero elsewhere) and the routing map, or dense ``[*lead, topk]`` expert ids (no
      ``[*lead, E]`` map is computed) ordered by selection score, ties to the lower id.

    Raises:
      TypeError / ValueError naming the argument, before anything is traced (SPEC §5).
    """
    opts = make_options(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
                        score_function, expert_bias)
    fmt = routing_map_format_of(routing_map_format)
    index_dtype = reference.dense_index_dtype(opts, logits, fmt, topk_indices, topk_indices_dtype)
    if not _use_kernels(implementation):
        return reference.fused_topk_with_score_function(
            logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
            score_function, expert_bias, routing_map_format, topk_indices, topk_indices_dtype)
    call = _Call(opts, _DENSE if index_dtype is not None else _MAP,
                 fmt == RoutingMapFormat.BITMAP_U8 and index_dtype is None,
                 index_dtype, jnp.dtype(logits.dtype))
    return _route(call, sharding.whole_last_dim(logits), expert_bias,
                  sharding.whole_last_dim(topk_indices))


def route_topk(
    logits: jax.Array,
    topk: int,
    *,
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    scaling_factor: float | None = None,
    score_function: Any = "softmax",
    expert_bias: jax.Array | None = None,
    index_dtype: Any = jnp.int32,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Compact, dispatcher-ready routing: ``(topk_weights, topk_indices)``, no ``[*lead, E]``.

    Equivalent to (for NaN-free scores, no groups)::

        s = score_function(logits)                   # softmax: raw logits unless pre-softmax
        _, idx = jax.lax.top_k(s + expert_bias, topk)  # ties: lower expert id first
        w = normalise(take_along_axis(s, idx, -1))    # softmax over selected logits / s / sum(s)
        return scaling_factor * w, idx

    Args are those of ``fused_topk_with_score_function``, plus ``index_dtype`` (int16 / int32 /
    int64) for the indices. ``topk_weights`` is float32 ``[*lead, topk]``; the gradient reaches
    ``logits`` through a backward kernel that reads only compact ``[*lead, topk]`` residuals.
    """
    opts = make_options(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
                        score_function, expert_bias)
    idx_dtype = index_dtype_of(index_dtype, opts.num_experts, "index_dtype")
    if not _use_kernels(implementation):
        return reference.route_topk(
            logits, topk, use_pre_softmax=use_pre_softmax, num_groups=num_groups,
            group_topk=group_topk, scaling_factor=scaling_factor, score_function=score_function,
            expert_bias=expert_bias, index_dtype=index_dtype)
    call = _Call(opts, _COMPACT, False, idx_dtype, jnp.dtype(logits.dtype))
    return _route(call, sharding.whole_last_dim(logits), expert_bias, None)
