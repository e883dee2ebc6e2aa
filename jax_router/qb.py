"""Quantile-balancing ("QB") routing (docs/semantics.md#qb): TransformerEngine's Kimi-K3 router.

Path to the kernel: ``route_topk_qb`` / ``fused_topk_with_score_function_qb`` validate
(``options.qb_options``), then ``_qb_route`` (a ``jax.custom_vjp``) calls ``_qb_kernel``, a
``custom_partitioning`` function whose body is the ``jax_router_qb_fwd`` custom call
(``QbFwdCpu`` in ffi/router_cpu.cc, ``QbFwdCuda`` in ffi/router_cuda.cu): the sigmoid router of
ffi/routing_math.h ranking ``topk + 1`` experts, whose last is the cutoff, and counting every
expert of every row into the histogram. The backward is the plain router's (``jax_router_bwd``,
sigmoid): QB changes which experts are kept, not how the weights depend on the logits.

Sharding: on one device, and per device inside ``shard_map``, ``_qb_kernel`` is the plain
custom call, which adds its counts to the given histogram in place. When XLA partitions it over
several devices, ``_partition`` runs the kernel on each device's rows with a zero histogram,
sums the counts over the mesh axes that shard the rows (``psum``, an all-reduce of the
``[E, num_bins]`` counts, never of the logits) and adds the given histogram once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import DTypeLike

from . import _ffi, custom_calls, reference
from .options import (
    OutputMode,
    RouteOptions,
    RoutingMapFormat,
    RoutingMapFormatLike,
    ScoreFunctionLike,
    as_array,
    dense_index_dtype,
    index_dtype_of,
    qb_inputs,
    routing_map_format_of,
)
from .router import _Call, _backward, autodiff_guard, output_types


@dataclasses.dataclass(frozen=True)
class _QbCall:
    """Everything static about one QB call (the custom_vjp's non-differentiable argument)."""

    route: _Call  # the plain router's call: outputs, and the backward's options
    num_bins: int


def _out_types(call: _QbCall, logits, residuals: bool):
    """Types of jax_router_qb_fwd's 7 outputs: the router's five (router.output_types), the
    cutoff ``[*lead]`` (sharded as the token dims) and the ``[E, num_bins]`` histogram."""
    t = jax.typeof(logits)
    lead = logits.shape[:-1]
    cutoff = t.update(shape=lead, dtype=jnp.float32,
                      sharding=t.sharding.update(spec=P(*_lead_spec(t, len(lead)))))
    hist = t.update(shape=(call.route.opts.num_experts, call.num_bins), dtype=jnp.int32,
                    sharding=t.sharding.update(spec=P(None, None)))
    return output_types(call.route, logits, residuals) + (cutoff, hist)


def _kernel_body(call: _QbCall, residuals: bool, logits, bias, bin_bounds, histogram):
    attrs = call.route.opts.ffi_attrs(call.route.mode, call.route.map_format, call.num_bins)
    return custom_calls.ffi_qb_forward(_out_types(call, logits, residuals), logits, bias,
                                       bin_bounds, histogram, None, attrs)


# ---- partitioning over several devices --------------------------------------------------------


def _lead_spec(aval, n: int) -> tuple:
    spec = tuple(getattr(aval.sharding, "spec", ())) if aval.sharding is not None else ()
    return (spec + (None,) * aval.ndim)[:n]


def _axes(lead_spec) -> tuple[str, ...]:
    """Mesh axis names that shard the token dims, in order."""
    out = []
    for entry in lead_spec:
        if entry is None:
            continue
        out.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(out)


def _shardings(mesh, n: int, lead, arg_shapes, result_shape):
    """Token dims of every [*lead, X] / [*lead] buffer sharded as `lead`, everything else whole."""
    lead_shape = arg_shapes[0].shape[:n]

    def one(a):
        if custom_calls.is_rowwise(a.shape, n, lead_shape):
            return NamedSharding(mesh, P(*lead, *(None,) * (a.ndim - n)))
        return NamedSharding(mesh, P(*(None,) * a.ndim))

    return [one(a) for a in arg_shapes], [one(a) for a in result_shape]


def _infer(call, residuals, mesh, arg_shapes, result_shape):
    n = arg_shapes[0].ndim - 1
    _, outs = _shardings(mesh, n, _lead_spec(arg_shapes[0], n), arg_shapes, result_shape)
    return outs


def _partition(call, residuals, mesh, arg_shapes, result_shape):
    n = arg_shapes[0].ndim - 1
    lead = _lead_spec(arg_shapes[0], n)
    axes = _axes(lead)
    args, outs = _shardings(mesh, n, lead, arg_shapes, result_shape)

    def lower(logits, bias, bin_bounds, histogram):
        outs = _kernel_body(call, residuals, logits, bias, bin_bounds,
                            jnp.zeros_like(histogram))
        counts = jax.lax.psum(outs[-1], axes) if axes else outs[-1]
        return outs[:-1] + (histogram + counts,)

    return mesh, lower, tuple(outs), tuple(args)


def _rule(call, residuals, mesh, arg_types, result_types):
    """Shardy: token dims shared by the [*lead, X] / [*lead] buffers; every other dim replicated.
    (arg_types / result_types are MLIR tensor types: .shape only.)"""
    return custom_calls.row_sharding_rule([t.shape for t in arg_types],
                                          [t.shape for t in result_types],
                                          len(arg_types[0].shape) - 1)


@functools.partial(custom_partitioning, static_argnums=(0, 1))
def _qb_kernel(call, residuals, logits, bias, bin_bounds, histogram):
    return _kernel_body(call, residuals, logits, bias, bin_bounds, histogram)


_qb_kernel.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                         sharding_rule=_rule)


@functools.cache
def _kernel(call: _QbCall, residuals: bool):
    """``_qb_kernel`` for one call, with a vmap rule (custom_partitioning has none): one call
    per batch member, in order (``lax.map``), since each member has its own histogram."""

    @jax.custom_batching.custom_vmap
    def kernel(logits, bias, bin_bounds, histogram):
        return _qb_kernel(call, residuals, logits, bias, bin_bounds, histogram)

    @kernel.def_vmap
    def rule(axis_size, in_batched, logits, bias, bin_bounds, histogram):
        args = [a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
                for a, batched in zip((logits, bias, bin_bounds, histogram), in_batched)]
        outs = jax.lax.map(lambda a: kernel(*a), tuple(args))
        return outs, tuple(True for _ in outs)

    return kernel


# ---- custom_vjp --------------------------------------------------------------------------------


def _primal(call: _QbCall, outs):
    probs, routing_map, weights, indices, _, cutoff, hist = outs
    mode = call.route.mode
    if mode == OutputMode.COMPACT:
        return weights, indices, cutoff, hist
    return (probs, routing_map if mode == OutputMode.MAP else indices, cutoff, hist)


def _qb_impl(call, logits, bias, bin_bounds, histogram):
    return _primal(call, _kernel(call, False)(logits, bias, bin_bounds, histogram))


def _qb_fwd(call, logits, bias, bin_bounds, histogram):
    outs = _kernel(call, True)(logits, bias, bin_bounds, histogram)
    return _primal(call, outs), (outs[3], outs[4], bias, bin_bounds)


def _qb_bwd(call, residuals, cotangents):
    idx, act, bias, bin_bounds = residuals
    grad_logits = _backward(call.route, cotangents[0], idx, act, None)
    return (grad_logits, None if bias is None else jnp.zeros_like(bias),
            jnp.zeros_like(bin_bounds), None)


_qb_route = jax.custom_vjp(_qb_impl, nondiff_argnums=(0,))
_qb_route.defvjp(_qb_fwd, _qb_bwd)


def _use_kernels(implementation: str | None) -> bool:
    return _ffi.use_kernels(implementation, (_ffi.QB_FWD_TARGET, _ffi.BWD_TARGET),
                            "router kernels")


def _run(call: _QbCall, logits, bias, bin_bounds, histogram):
    opts = call.route.opts
    bias = (bias.astype(jnp.float32) if bias is not None
            else jnp.zeros((opts.num_experts,), jnp.float32))
    bin_bounds = bin_bounds.astype(jnp.float32)
    if histogram is None:
        histogram = jnp.zeros((opts.num_experts, call.num_bins), jnp.int32)
    return autodiff_guard(_qb_route, call, custom_calls.whole_last_dim(logits), bias,
                          bin_bounds, histogram)


# ---- public functions --------------------------------------------------------------------------


def route_topk_qb(
    logits: jax.Array,
    topk: int,
    expert_bias: jax.Array | None,
    bin_bounds: jax.Array,
    num_bins: int,
    histogram: jax.Array | None = None,
    *,
    scaling_factor: float | None = None,
    index_dtype: DTypeLike = jnp.int32,
    score_function: ScoreFunctionLike = "sigmoid",
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Quantile-balancing routing, compact: ``(topk_weights, topk_indices, cutoff, histogram)``.

    Per row, with ``s = sigmoid(x)`` and ``z = s + expert_bias`` (float32): the ``topk`` experts
    with the largest ``z`` and their weights, exactly as ``route_topk(..., score_function=
    "sigmoid", expert_bias=...)`` gives them (the same set TransformerEngine obtains by ranking
    ``topk + 1`` and dropping the last, the higher id on a tie); ``cutoff``, the ``(topk + 1)``-th
    largest ``z``; and for every expert ``e`` one count in
    ``histogram[e, clamp(floor(((cutoff - s[e]) - lower) * scale), 0, num_bins - 1)]`` (NaN to
    bin 0), ``scale = float32(num_bins) / (upper - lower)``: the bias the expert would have
    needed to be selected, binned. The training loop reads quantiles of the histogram to update
    ``expert_bias``.

    Args:
      logits: ``[*lead, E]`` float32 / bfloat16 / float16.
      topk: experts per token, ``1 <= topk`` and ``topk + 1 <= E``.
      expert_bias: ``[E]`` float array (None: zeros), used for selection and the cutoff only.
      bin_bounds: float ``[2]`` array ``[lower, upper]`` (used as float32). Concrete bounds
        must be finite with ``lower < upper``; for traced bounds the formula above defines the
        result, and nothing is written out of bounds.
      num_bins: static int in ``[1, 2^24]``.
      histogram: int32 ``[E, num_bins]`` counts to add to (None: zeros). Donate it under
        ``jax.jit`` to accumulate in place.
      scaling_factor: multiplier on the weights (None: 1.0).
      index_dtype: int16 / int32 / int64 of ``topk_indices``.
      score_function, use_pre_softmax, num_groups, group_topk: accepted for TransformerEngine
        call compatibility; anything but sigmoid without pre-softmax or groups is an error.
      implementation: None, "ffi" or "xla", as in ``route_topk``.

    Returns:
      ``topk_weights`` float32 ``[*lead, topk]``, ``topk_indices`` ``[*lead, topk]`` (score
      descending, ties to the lower id), ``cutoff`` float32 ``[*lead]`` and ``histogram`` int32
      ``[E, num_bins]``: the given counts plus this call's (``T`` per expert). The gradient
      reaches ``logits`` through the weights (as sigmoid routing); ``cutoff`` and
      ``histogram`` carry none. Under ``jax.jit`` with token-sharded logits each device
      routes its rows and the histogram is the global one (the devices' counts summed).

    Raises:
      TypeError / ValueError naming the argument, at trace time (``options.qb_options``).
    """
    opts, nb, logits, expert_bias, bin_bounds, histogram = qb_inputs(
        logits, topk, expert_bias, bin_bounds, num_bins, histogram, scaling_factor,
        score_function, use_pre_softmax, num_groups, group_topk)
    idx_dtype = index_dtype_of(index_dtype, opts.num_experts, "index_dtype")
    if not _use_kernels(implementation):
        return reference.qb_weights_and_indices(opts, nb, idx_dtype, logits, expert_bias,
                                                bin_bounds, histogram)
    call = _QbCall(_Call(opts, OutputMode.COMPACT, RoutingMapFormat.BYTEMAP, idx_dtype,
                         jnp.dtype(logits.dtype)), nb)
    return _run(call, logits, expert_bias, bin_bounds, histogram)


def fused_topk_with_score_function_qb(
    logits: jax.Array,
    topk: int,
    expert_bias: jax.Array | None,
    bin_bounds: jax.Array,
    num_bins: int,
    histogram: jax.Array | None = None,
    scaling_factor: float | None = None,
    routing_map_format: RoutingMapFormatLike = "bytemap",
    topk_indices: jax.Array | None = None,
    topk_indices_dtype: DTypeLike | None = None,
    *,
    score_function: ScoreFunctionLike = "sigmoid",
    use_pre_softmax: bool = False,
    num_groups: int | None = None,
    group_topk: int | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Quantile-balancing routing with TransformerEngine-style outputs:
    ``(probs, routing_output, cutoff, histogram)``.

    The routing, cutoff and histogram of ``route_topk_qb``; ``probs`` ``[*lead, E]`` in the
    logits dtype (``scaling_factor * p`` at the selected experts, 0 elsewhere) and
    ``routing_output`` as in ``fused_topk_with_score_function``: a bytemap / bitmap_u8 routing
    map, or dense ``[*lead, topk]`` indices when ``topk_indices`` (a buffer that fixes their
    dtype and shape; its contents are not read) or ``topk_indices_dtype`` is given. Arguments
    otherwise as ``route_topk_qb``.
    """
    opts, nb, logits, expert_bias, bin_bounds, histogram = qb_inputs(
        logits, topk, expert_bias, bin_bounds, num_bins, histogram, scaling_factor,
        score_function, use_pre_softmax, num_groups, group_topk)
    topk_indices = as_array(topk_indices)
    fmt = routing_map_format_of(routing_map_format)
    index_dtype = dense_index_dtype(opts, logits, fmt, topk_indices, topk_indices_dtype)
    if not _use_kernels(implementation):
        return reference.qb_probs_and_routing(opts, nb, fmt, index_dtype, logits, expert_bias,
                                              bin_bounds, histogram)
    call = _QbCall(_Call(opts, OutputMode.DENSE if index_dtype is not None else OutputMode.MAP,
                         fmt, index_dtype, jnp.dtype(logits.dtype)), nb)
    return _run(call, logits, expert_bias, bin_bounds, histogram)
