"""The fused router: public functions, their ``custom_vjp`` and the FFI calls.

Path to the kernel: ``route_topk`` / ``fused_topk_with_score_function`` validate (options.py),
then ``_route`` (a ``jax.custom_vjp``) calls the ``jax_router_fwd`` custom call (through
custom_calls.py, which binds it and partitions it row-wise over token-sharded inputs), which
runs ``FwdCpu`` in ffi/router_cpu.cc or ``FwdCuda`` in ffi/router_cuda.cu; the backward calls
``jax_router_bwd`` with the compact residuals (selected indices and their scores). The math
both run is ffi/routing_math.h (docs/semantics.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike

from . import _ffi, custom_calls, reference
from .options import (
    dense_index_dtype,
    OutputMode,
    RouteOptions,
    RoutingMapFormat,
    RoutingMapFormatLike,
    ScoreFunctionLike,
    as_array,
    index_dtype_of,
    make_options,
    routing_map_format_of,
    static_bool,
)


@dataclasses.dataclass(frozen=True)
class _Call:
    """Everything static about one routing call (the custom_vjp's non-differentiable arg)."""

    opts: RouteOptions
    mode: OutputMode  # COMPACT: (weights, indices); MAP: (probs, map); DENSE: (probs, indices)
    map_format: RoutingMapFormat  # of the map (MAP mode)
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


def output_types(call: _Call, logits, residuals: bool) -> tuple:
    """Types of the forward's five outputs (probs, map, weights, indices, act) for ``call``;
    the ones the mode does not ask for are zero-size."""
    opts = call.opts
    lead, E, k = logits.shape[:-1], opts.num_experts, opts.topk
    bitmap = call.map_format == RoutingMapFormat.BITMAP_U8
    want_probs = call.mode in (OutputMode.MAP, OutputMode.DENSE)
    want_idx = call.mode in (OutputMode.COMPACT, OutputMode.DENSE) or residuals
    idx_dtype = call.index_dtype if call.index_dtype is not None else jnp.int32
    map_shape = lead + (((E + 7) // 8) if bitmap else E,)
    return (
        _aval(logits, lead + (E,), logits.dtype) if want_probs else _empty(logits, logits.dtype),
        _aval(logits, map_shape, jnp.uint8 if bitmap else jnp.bool_)
        if call.mode == OutputMode.MAP
        else _empty(logits, jnp.bool_),
        _aval(logits, lead + (k,), jnp.float32) if call.mode == OutputMode.COMPACT
        else _empty(logits, jnp.float32),
        _aval(logits, lead + (k,), idx_dtype) if want_idx else _empty(logits, idx_dtype),
        _aval(logits, lead + (k,), jnp.float32) if residuals else _empty(logits, jnp.float32),
    )


def _forward(call: _Call, logits, bias, alias, residuals: bool):
    """One jax_router_fwd call; returns (probs, map, weights, indices, act), unused ones empty."""
    opts = call.opts
    out_types = output_types(call, logits, residuals)
    bias_arg = bias.astype(jnp.float32) if bias is not None else jnp.zeros((0,), jnp.float32)
    return custom_calls.ffi_forward(out_types, logits, bias_arg, alias,
                                    opts.ffi_attrs(call.mode, call.map_format))


def _backward(call: _Call, g, idx, act, logits):
    opts = call.opts
    shape = act.shape[:-1] + (opts.num_experts,)
    lg = logits if opts.pre_softmax else jnp.zeros((0,), jnp.float32)
    return custom_calls.ffi_backward(_aval(act, shape, call.logits_dtype), g, idx, act, lg,
                                     opts.ffi_attrs(call.mode, call.map_format))


def _primal(call: _Call, outs):
    probs, routing_map, weights, indices, _ = outs
    if call.mode == OutputMode.COMPACT:
        return weights, indices
    return (probs, routing_map) if call.mode == OutputMode.MAP else (probs, indices)


def _route_impl(call, logits, bias, alias):
    return _primal(call, _forward(call, logits, bias, alias, residuals=False))


def _route_fwd(call, logits, bias, alias):
    outs = _forward(call, logits, bias, alias, residuals=True)
    residuals = (outs[3], outs[4], logits if call.opts.pre_softmax else None, bias)
    return _primal(call, outs), residuals


def _route_bwd(call, residuals, cotangents):
    idx, act, logits, bias = residuals
    grad_logits = autodiff_guard(_backward, call, cotangents[0], idx, act, logits)
    return grad_logits, None if bias is None else jnp.zeros_like(bias), None


_route = jax.custom_vjp(_route_impl, nondiff_argnums=(0,))
_route.defvjp(_route_fwd, _route_bwd)

_AUTODIFF_MODES = (
    "the kernels have a reverse-mode rule only (jax.custom_vjp), so jax.grad, jax.vjp and "
    "jax.jacrev work but forward mode (jax.jvp, jax.jacfwd) and second-order derivatives "
    "(grad of grad, jax.hessian) do not. Where you need those, pass implementation='xla' "
    "(pure JAX, every autodiff mode)"
)


def autodiff_guard(fn, *args):
    """``fn(*args)`` (a custom_vjp over the FFI calls), with JAX's generic errors for the
    autodiff modes the kernels lack replaced by one that says so and what to use instead."""
    try:
        return fn(*args)
    except TypeError as e:
        if "forward-mode autodiff" not in str(e):
            raise
        raise TypeError(f"jax_router: forward-mode autodiff is not supported: {_AUTODIFF_MODES}"
                        ) from e
    except NotImplementedError as e:
        if "Differentiation rule for 'jax_router" not in str(e):
            raise
        raise NotImplementedError(
            f"jax_router: second-order autodiff is not supported: {_AUTODIFF_MODES}") from e


def _use_kernels(implementation: str | None) -> bool:
    return _ffi.use_kernels(implementation, (_ffi.FWD_TARGET, _ffi.BWD_TARGET), "router kernels")


def fused_topk_with_score_function(
    logits: jax.Array,
    topk: int,
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    scaling_factor: float | None = None,
    score_function: ScoreFunctionLike = "softmax",
    expert_bias: jax.Array | None = None,
    routing_map_format: RoutingMapFormatLike = "bytemap",
    topk_indices: jax.Array | None = None,
    topk_indices_dtype: DTypeLike | None = None,
    *,
    compute_aux_scores: bool = False,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fused MoE routing with TransformerEngine's signature; returns ``(probs, routing_output)``.

    Per token row ``x``: scores ``s`` (softmax / sigmoid / sqrtsoftplus), selection scores
    ``z = s + expert_bias``, optional group-limited routing, the ``topk`` largest ``z``, and
    weights from the unbiased ``s`` (docs/semantics.md#forward), all in float32.

    Args:
      logits: ``[*lead, E]`` float32 / bfloat16 / float16 router logits; any number of leading
        (token) dims, possibly empty.
      topk: experts per token, an int with ``1 <= topk <= E``.
      use_pre_softmax: softmax only. True: softmax over all E, select on it, weights are the
        selected probabilities (not renormalised). False: select on the raw logits, weights are
        a softmax over the ``topk`` selected logits.
      num_groups: group-limited routing: experts form ``num_groups`` contiguous groups of
        ``E / num_groups``. None or -1 (with ``group_topk`` None or -1): off.
      group_topk: groups kept per token; a group's score is the sum of its top
        ``topk / group_topk`` selection scores. None or -1: off.
      scaling_factor: multiplier on the final weights; None means 1.0.
      score_function: "softmax", "sigmoid" or "sqrtsoftplus", or an enum member with one of
        those names (``jax_router.ScoreFunction``, TransformerEngine's, ...).
      expert_bias: ``[E]`` float32 / bfloat16 / float16, sigmoid / sqrtsoftplus only. Added to
        the selection score only: it never changes the weights, and gets a zero gradient.
      routing_map_format: "bytemap" (``bool[*lead, E]``) or "bitmap_u8"
        (``uint8[*lead, ceil(E/8)]``, bit ``e % 8`` of byte ``e // 8``, LSB first, padding
        bits 0); a ``RoutingMapFormat``, an enum member of that name, or 0 / 1 also work.
      topk_indices: optional ``[*lead, topk]`` int16 / int32 / int64 array. Requests dense
        indices of its dtype; it is aliased to that output, so donating it under ``jax.jit``
        reuses its memory. Its contents are not read.
      topk_indices_dtype: int16 / int32 / int64: requests dense indices of this dtype without a
        buffer (if both are given they must agree).
      compute_aux_scores: keyword only. True: TransformerEngine's newer form of the aux-loss
        scores, returning ``(scores, routing_map)`` exactly as
        ``fused_compute_score_for_moe_aux_loss(logits, topk, score_function,
        routing_map_format)`` returns ``(routing_map, scores)``. As in TransformerEngine,
        ``use_pre_softmax``, the groups, ``scaling_factor`` and ``expert_bias`` are then
        validated but ignored; dense indices are an error.
      implementation: None (the FFI kernels where this backend has them, else pure JAX),
        "ffi" (require the kernels) or "xla" (pure JAX, ``jax_router.reference``). Keyword only.

    Array arguments may be anything ``jnp.asarray`` takes (numpy arrays, lists), converted by
    its rules (float64 becomes float32 unless ``jax_enable_x64`` is on). The options other than
    arrays are static: traced values are an error. Differentiable in reverse mode only
    (``jax.grad``, ``jax.vjp``); forward mode and second order raise, except with
    ``implementation="xla"``.

    Returns:
      ``(probs, routing_output)``. ``probs``: ``[*lead, E]`` in the logits dtype,
      ``scaling_factor * p`` at the ``topk`` selected experts, 0 elsewhere. ``routing_output``:
      the routing map in ``routing_map_format``, or, when dense indices were requested, the
      ``[*lead, topk]`` expert ids (no ``[*lead, E]`` map is computed), ordered by selection
      score descending, ties to the lower id. Only ``logits`` is differentiable (through
      ``probs``); the backward kernel reads compact ``[*lead, topk]`` residuals.

    Raises:
      TypeError / ValueError naming the argument and the rule, at trace time, before anything
      runs: every rule of ``jax_router.options.make_options``, plus an index dtype other than
      int16 / int32 / int64, int16 with ``E > 32767``, int64 while ``jax_enable_x64`` is off,
      a ``topk_indices`` buffer not of shape ``[*lead, topk]``, dense indices together with
      "bitmap_u8", an unknown ``routing_map_format`` or ``implementation``, and
      ``implementation="ffi"`` in a build without the kernels.
    """
    logits, expert_bias = as_array(logits), as_array(expert_bias)
    topk_indices = as_array(topk_indices)
    opts = make_options(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
                        score_function, expert_bias)
    fmt = routing_map_format_of(routing_map_format)
    if static_bool(compute_aux_scores, "compute_aux_scores"):
        if topk_indices is not None or topk_indices_dtype is not None:
            raise ValueError("compute_aux_scores=True returns (scores, routing_map): dense "
                             "indices (topk_indices / topk_indices_dtype) are not available")
        from .aux_loss import fused_compute_score_for_moe_aux_loss  # aux_loss imports us

        routing_map, scores = fused_compute_score_for_moe_aux_loss(
            logits, topk, score_function, fmt, implementation=implementation)
        return scores, routing_map
    index_dtype = dense_index_dtype(opts, logits, fmt, topk_indices, topk_indices_dtype)
    if not _use_kernels(implementation):
        return reference.probs_and_routing(opts, fmt, index_dtype, logits, expert_bias)
    call = _Call(opts, OutputMode.DENSE if index_dtype is not None else OutputMode.MAP,
                 fmt, index_dtype, jnp.dtype(logits.dtype))
    return autodiff_guard(_route, call, custom_calls.whole_last_dim(logits), expert_bias,
                          custom_calls.whole_last_dim(topk_indices))


def route_topk(
    logits: jax.Array,
    topk: int,
    *,
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    scaling_factor: float | None = None,
    score_function: ScoreFunctionLike = "softmax",
    expert_bias: jax.Array | None = None,
    index_dtype: DTypeLike = jnp.int32,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Compact, dispatcher-ready routing: ``(topk_weights, topk_indices)``, no ``[*lead, E]``.

    Equivalent to (for NaN-free scores, no groups)::

        s = score_function(logits)                   # softmax: raw logits unless pre-softmax
        _, idx = jax.lax.top_k(s + expert_bias, topk)  # ties: lower expert id first
        w = normalise(take_along_axis(s, idx, -1))    # softmax over selected logits / s / sum(s)
        return scaling_factor * w, idx

    Args:
      logits: ``[*lead, E]`` float32 / bfloat16 / float16 router logits.
      topk: experts per token, an int with ``1 <= topk <= E``.
      use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias:
        as in ``fused_topk_with_score_function`` (keyword only here).
      index_dtype: int16 / int32 (default) / int64, the dtype of ``topk_indices``.
      implementation: None, "ffi" or "xla", as in ``fused_topk_with_score_function``.

    Arrays, static options and autodiff modes as in ``fused_topk_with_score_function``.

    Returns:
      ``topk_weights``: float32 ``[*lead, topk]``, the values ``probs`` would hold at the
      selected experts (``scaling_factor`` applied). ``topk_indices``: ``[*lead, topk]`` of
      ``index_dtype``, expert ids in ``[0, E)``, distinct per row, ordered by selection score
      descending, ties to the lower id. Nothing of shape ``[*lead, E]`` is written in the
      forward pass; the gradient reaches ``logits`` (in its dtype) through a backward kernel
      that reads only the compact ``[*lead, topk]`` residuals.

    Raises:
      TypeError / ValueError naming the argument, at trace time: the rules of
      ``jax_router.options.make_options``, a bad ``index_dtype`` (not int16 / int32 / int64,
      int16 with ``E > 32767``, int64 while ``jax_enable_x64`` is off), an unknown
      ``implementation``, or ``implementation="ffi"`` in a build without the kernels.
    """
    logits, expert_bias = as_array(logits), as_array(expert_bias)
    opts = make_options(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
                        score_function, expert_bias)
    idx_dtype = index_dtype_of(index_dtype, opts.num_experts, "index_dtype")
    if not _use_kernels(implementation):
        return reference.weights_and_indices(opts, idx_dtype, logits, expert_bias)
    call = _Call(opts, OutputMode.COMPACT, RoutingMapFormat.BYTEMAP, idx_dtype,
                 jnp.dtype(logits.dtype))
    return autodiff_guard(_route, call, custom_calls.whole_last_dim(logits), expert_bias, None)
