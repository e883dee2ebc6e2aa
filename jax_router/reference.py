"""Pure-JAX router: the executable form of docs/semantics.md#forward and the fallback where no kernel exists.

Same public signatures as ``jax_router.fused_topk_with_score_function`` and
``jax_router.route_topk``; gradients come from JAX autodiff, which gives docs/semantics.md#backward.

Order promise: the ``topk`` slots of a row hold the experts with the largest selection score
``z``, descending, equal scores by ascending expert id — ``jax.lax.top_k`` on ``z`` for NaN-free
rows (so ``+0`` ranks above ``-0``); NaN scores rank below every number. This is the order of the
integer keys ``order_key`` (the map of ffi/routing_math.h that the kernels select on); ``spec_top_k``
reaches it with float top-k, XLA's fast path. Group scores are sums of a group's top ``topk // group_topk`` scores,
added one by one in descending order, as the kernels add them.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from .options import (
    RouteOptions,
    RoutingMapFormatLike,
    ScoreFunction,
    ScoreFunctionLike,
    RoutingMapFormat,
    index_dtype_of,
    as_array,
    aux_scores_options,
    dense_index_dtype,
    make_options,
    routing_map_format_of,
)

_INT32_MIN = np.int32(np.iinfo(np.int32).min)
EPS = 1e-20


def order_key(z: jax.Array) -> jax.Array:
    """float32 -> int32, order-preserving; NaN -> INT32_MIN + 1, -0 < +0 (routing_math.h order_key)."""
    u = jax.lax.bitcast_convert_type(z, jnp.uint32)
    key = jnp.where(u >= np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))
    key = jnp.where(jnp.isnan(z), np.uint32(1), key)
    return jax.lax.bitcast_convert_type(key ^ np.uint32(0x80000000), jnp.int32)


@jax.custom_jvp
def _sqrtsoftplus(x: jax.Array) -> jax.Array:
    big = x > 20.0
    return jnp.sqrt(jnp.where(big, x, jnp.log1p(jnp.exp(jnp.where(big, 0.0, x)))))


@_sqrtsoftplus.defjvp
def _sqrtsoftplus_jvp(primals, tangents):
    # docs/semantics.md#backward: ds/dx = sigmoid(x) / (2 s + eps), finite where s underflows to 0.
    (x,), (dx,) = primals, tangents
    s = _sqrtsoftplus(x)
    return s, dx * (jax.nn.sigmoid(x) / (2.0 * s + EPS))  # one factor: no inf * 0 in the transpose


@jax.custom_jvp
def _normalize(s: jax.Array) -> jax.Array:
    """s / (sum(s) + eps) over the last axis."""
    return s / (jnp.sum(s, axis=-1, keepdims=True) + EPS)


@_normalize.defjvp
def _normalize_jvp(primals, tangents):
    # d(s / (A + eps)) = (t - p * sum(t)) / (A + eps): no (A + eps)^2, which overflows float32
    # when every selected score underflows to 0.
    (s,), (t,) = primals, tangents
    p = _normalize(s)
    inv = 1.0 / (jnp.sum(s, axis=-1, keepdims=True) + EPS)
    return p, inv * (t - p * jnp.sum(t, axis=-1, keepdims=True))


# The activation of each score function (docs/semantics.md#forward-activation); softmax's is
# the raw logit (its pre-softmax form is applied by the caller). A function missing here is an
# error, never another function's activation.
_ACTIVATIONS = {
    ScoreFunction.SOFTMAX: lambda x: x,
    ScoreFunction.SIGMOID: jax.nn.sigmoid,  # its derivative stays finite where e^-x overflows
    ScoreFunction.SQRTSOFTPLUS: lambda x: _sqrtsoftplus(x),
}


def activation(fn: ScoreFunction, x: jax.Array) -> jax.Array:
    """Score ``s`` of float32 logits ``x``: sigmoid, sqrt(softplus), or ``x`` itself for
    softmax (whose pre-softmax is applied by the caller). Same shape and dtype as ``x``."""
    if fn not in _ACTIVATIONS:
        raise NotImplementedError(f"the reference has no activation for score function {fn!r}")
    return _ACTIVATIONS[fn](x)


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(a, idx, axis=-1)


def _sum_in_order(vals: jax.Array) -> jax.Array:
    """Adds the last axis left to right, as the kernels do."""
    total = vals[..., 0]
    for j in range(1, vals.shape[-1]):
        total = total + vals[..., j]
    return total


def spec_top_k(z: jax.Array, k: int, kept: jax.Array | None = None) -> jax.Array:
    """Indices of the ``k`` best scores of each row in the documented order (docs/semantics.md#forward-order).

    Descending ``z``, ties to the lower index, NaN below every number, and candidates outside
    ``kept`` below NaN. One float ``lax.top_k`` (XLA's fast path) settles every slot that holds
    a value above -inf; slots past them are filled from a second ranking of the rest: -inf
    candidates, then NaN ones, then excluded ones, each by ascending index. Identical to
    ``lax.top_k(order_key(z), k)`` but several times faster on CPU than an integer top-k.
    """
    neg_inf = jnp.float32(-jnp.inf)
    usable = ~jnp.isnan(z) if kept is None else (~jnp.isnan(z) & kept)
    z1 = jnp.where(usable, z, neg_inf)
    vals, idx = jax.lax.top_k(z1, k)
    n_fin = jnp.sum(vals > neg_inf, axis=-1, keepdims=True)
    in_kept = jnp.ones(z.shape, bool) if kept is None else kept
    tier = jnp.where(z1 > neg_inf, -1.0,
                     jnp.where(in_kept, jnp.where(jnp.isnan(z), 1.0, 2.0), 0.0))
    _, tail = jax.lax.top_k(tier.astype(jnp.float32), k)
    slot = jnp.arange(k)
    from_tail = jnp.take_along_axis(tail, jnp.clip(slot - n_fin, 0, k - 1), axis=-1)
    return jnp.where(slot < n_fin, idx, from_tail)


def route_core(
    logits: jax.Array, opts: RouteOptions, expert_bias: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The routing of docs/semantics.md#forward for options ``opts`` (from ``make_options``).

    Returns ``(idx, p, s_sel)``: int32 ``[*lead, k]`` selected expert ids in the documented order (docs/semantics.md#forward-order),
    float32 ``[*lead, k]`` weights before ``scaling_factor``, and float32 ``[*lead, k]``
    unbiased scores ``s`` at the selected experts. Differentiable w.r.t. ``logits`` (the
    selection is under ``stop_gradient``).
    """
    x = logits.astype(jnp.float32)
    fn = opts.score_function
    if fn == ScoreFunction.SOFTMAX:
        s = jax.nn.softmax(x, axis=-1) if opts.use_pre_softmax else x
        z = s
    else:
        s = activation(fn, x)
        z = s + expert_bias.astype(jnp.float32) if expert_bias is not None else s
    z = jax.lax.stop_gradient(z)

    kept = None
    if opts.group_topk > 0:
        lead, E, G = z.shape[:-1], opts.num_experts, opts.num_groups
        gs, m = E // G, opts.topk // opts.group_topk
        zg = z.reshape(*lead, G, gs)
        gscore = _sum_in_order(_take(zg, spec_top_k(zg, m)))
        best = spec_top_k(gscore, opts.group_topk)
        keep = jnp.any(best[..., :, None] == jnp.arange(G), axis=-2)
        kept = jnp.repeat(keep, gs, axis=-1)

    idx = spec_top_k(z, opts.topk, kept)
    s_sel = _take(s, idx)
    if fn == ScoreFunction.SOFTMAX and not opts.use_pre_softmax:
        p = jax.nn.softmax(_take(x, idx), axis=-1)
    elif fn != ScoreFunction.SOFTMAX and opts.topk > 1:
        p = _normalize(s_sel)
    else:
        p = s_sel
    return idx, p, s_sel


def scatter_rows(idx: jax.Array, vals: jax.Array, num_experts: int, dtype: Any) -> jax.Array:
    """[*lead, k] (ids, values) -> dense [*lead, E] with zeros off the ids."""
    lead, k = idx.shape[:-1], idx.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    flat_idx = idx.reshape(rows, k)
    out = jnp.zeros((rows, num_experts), dtype)
    out = out.at[jnp.arange(rows)[:, None], flat_idx].set(vals.reshape(rows, k).astype(dtype))
    return out.reshape(*lead, num_experts)


def pack_bitmap(routing_map: jax.Array) -> jax.Array:
    """bool [*lead, E] -> uint8 [*lead, ceil(E/8)], bit e % 8 of byte e // 8, LSB first."""
    E = routing_map.shape[-1]
    nbytes = (E + 7) // 8
    pad = [(0, 0)] * (routing_map.ndim - 1) + [(0, nbytes * 8 - E)]
    bits = jnp.pad(routing_map, pad).reshape(*routing_map.shape[:-1], nbytes, 8)
    weights = (1 << np.arange(8)).astype(np.uint8)
    return jnp.sum(bits.astype(jnp.uint8) * weights, axis=-1, dtype=jnp.uint8)


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
) -> tuple[jax.Array, jax.Array]:
    """Pure-JAX ``jax_router.fused_topk_with_score_function``: same arguments (without
    ``implementation``), same outputs, same errors; see that function for each of them.

    Gradients come from JAX autodiff. A ``topk_indices`` buffer only fixes the dtype and shape
    here (nothing is aliased).

    Returns:
      ``(probs, routing_output)``: ``probs [*lead, E]`` in the logits dtype; the routing map
      (``bool[*lead, E]`` or ``uint8[*lead, ceil(E/8)]``) or dense ``[*lead, topk]`` indices.

    Raises:
      TypeError / ValueError naming the argument (docs/semantics.md#validation).
    """
    logits, expert_bias = as_array(logits), as_array(expert_bias)
    topk_indices = as_array(topk_indices)
    opts = make_options(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
                        score_function, expert_bias)
    fmt = routing_map_format_of(routing_map_format)
    index_dtype = dense_index_dtype(opts, logits, fmt, topk_indices, topk_indices_dtype)
    return probs_and_routing(opts, fmt, index_dtype, logits, expert_bias)


def probs_and_routing(opts: RouteOptions, fmt: RoutingMapFormat, index_dtype: Any,
                      logits: jax.Array, expert_bias: jax.Array | None):
    """``fused_topk_with_score_function`` for options already validated (``make_options``,
    ``dense_index_dtype``): what the public function and jax_router's fallback both run."""
    idx, p, _ = route_core(logits, opts, expert_bias)
    probs = scatter_rows(idx, opts.scaling_factor * p, opts.num_experts, logits.dtype)
    if index_dtype is not None:
        return probs, idx.astype(index_dtype)
    routing_map = scatter_rows(idx, jnp.ones(idx.shape, jnp.bool_), opts.num_experts, jnp.bool_)
    if fmt == RoutingMapFormat.BITMAP_U8:
        routing_map = pack_bitmap(routing_map)
    return probs, routing_map


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
) -> tuple[jax.Array, jax.Array]:
    """Pure-JAX ``jax_router.route_topk``: same arguments (without ``implementation``).

    Returns:
      ``(topk_weights, topk_indices)``: float32 ``[*lead, topk]`` and ``[*lead, topk]`` of
      ``index_dtype``, in the documented order (docs/semantics.md#forward-order).

    Raises:
      TypeError / ValueError naming the argument (docs/semantics.md#validation).
    """
    logits, expert_bias = as_array(logits), as_array(expert_bias)
    opts = make_options(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
                        score_function, expert_bias)
    index_dtype = index_dtype_of(index_dtype, opts.num_experts, "index_dtype")
    return weights_and_indices(opts, index_dtype, logits, expert_bias)


def weights_and_indices(opts: RouteOptions, index_dtype: Any, logits: jax.Array,
                        expert_bias: jax.Array | None):
    """``route_topk`` for options already validated: what the public function and jax_router's
    fallback both run."""
    idx, p, _ = route_core(logits, opts, expert_bias)
    return opts.scaling_factor * p, idx.astype(index_dtype)


__all__ = ["fused_topk_with_score_function", "route_topk", "order_key", "route_core"]


# ---- auxiliary-loss helpers (docs/semantics.md#aux-loss) ----------------------------------------------------

_AUX_TPE_DTYPES = (jnp.int16, jnp.int32, jnp.int64, jnp.float32, jnp.bfloat16, jnp.float16)


def aux_scores(logits: jax.Array, fn: ScoreFunction) -> jax.Array:
    """float32 ``[*lead, E]`` scores over all E: softmax, or act(x) / (sum_{all E} act(x) + eps).

    ``logits`` may be any float dtype (computed in float32); differentiable w.r.t. it.
    """
    x = logits.astype(jnp.float32)
    if fn == ScoreFunction.SOFTMAX:
        return jax.nn.softmax(x, axis=-1)
    return _normalize(activation(fn, x))


def fused_compute_score_for_moe_aux_loss(
    logits: jax.Array,
    topk: int,
    score_function: ScoreFunctionLike,
    routing_map_format: RoutingMapFormatLike = "bytemap",
) -> tuple[jax.Array, jax.Array]:
    """Pure-JAX ``fused_compute_score_for_moe_aux_loss``: ``(routing_map, scores)``.

    ``scores`` is float32 ``[*lead, E]`` (softmax over E; sigmoid / sqrtsoftplus normalised by
    their sum over all E plus 1e-20, whatever ``topk``); ``routing_map`` marks the ``topk``
    largest scores (ties to the lower id), as bool ``[*lead, E]`` or LSB-first uint8 bitmap.
    Same arguments and errors as ``jax_router.fused_compute_score_for_moe_aux_loss`` (without
    ``implementation``).
    """
    logits = as_array(logits)
    opts, fmt = aux_scores_options(logits, topk, score_function, routing_map_format)
    return aux_map_and_scores(opts, fmt, logits)


def aux_map_and_scores(opts: RouteOptions, fmt: RoutingMapFormat, logits: jax.Array):
    """``fused_compute_score_for_moe_aux_loss`` for options already validated
    (``aux_scores_options``)."""
    scores = aux_scores(logits, opts.score_function)
    idx = spec_top_k(jax.lax.stop_gradient(scores), opts.topk)
    routing_map = scatter_rows(idx, jnp.ones(idx.shape, jnp.bool_), opts.num_experts, jnp.bool_)
    if fmt == RoutingMapFormat.BITMAP_U8:
        routing_map = pack_bitmap(routing_map)
    return routing_map, scores


def _is_array(v) -> bool:
    return hasattr(v, "dtype") and hasattr(v, "shape")


def aux_loss_scale(
    total_num_tokens: int | jax.Array,
    num_experts: int,
    topk: int,
    coeff: float | jax.Array,
) -> np.float32 | jax.Array:
    """Validates the scalar arguments of ``fused_moe_aux_loss``; returns
    ``C = E * coeff / (topk * T^2)`` (np.float32 when T and coeff are Python numbers, else a
    float32 JAX scalar).

    Raises:
      TypeError: a non-int ``num_experts`` / ``topk`` / ``total_num_tokens`` (or a non-numeric
        scalar array), a ``coeff`` that is neither a number nor a floating scalar array.
      ValueError: ``num_experts < 1``, ``topk`` outside ``[1, num_experts]``, a non-scalar or
        (as a Python int) non-positive ``total_num_tokens``, a non-finite Python ``coeff``.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)):
        raise TypeError(f"num_experts must be an int, got {num_experts!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise TypeError(f"topk must be an int, got {topk!r}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk must lie in [1, num_experts={num_experts}], got {topk}")
    if _is_array(total_num_tokens):
        if jnp.ndim(total_num_tokens) != 0:
            raise ValueError(
                f"total_num_tokens must be a scalar, got shape {tuple(jnp.shape(total_num_tokens))}")
        d = jnp.dtype(total_num_tokens.dtype)
        if not (jnp.issubdtype(d, jnp.integer) or jnp.issubdtype(d, jnp.floating)):
            raise TypeError(f"total_num_tokens must be an int or a numeric scalar, got dtype {d}")
    elif isinstance(total_num_tokens, bool) or not isinstance(total_num_tokens, (int, np.integer)):
        raise TypeError(f"total_num_tokens must be an int, got {total_num_tokens!r}")
    elif total_num_tokens <= 0:
        raise ValueError(f"total_num_tokens must be positive, got {total_num_tokens}")
    if _is_array(coeff):
        if jnp.ndim(coeff) != 0 or not jnp.issubdtype(coeff.dtype, jnp.floating):
            raise TypeError(f"coeff must be a float or a floating scalar, got {jax.typeof(coeff)}")
    else:
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float, np.integer, np.floating)):
            raise TypeError(f"coeff must be a float, got {coeff!r}")
        if not np.isfinite(float(coeff)):
            raise ValueError(f"coeff must be finite, got {coeff!r}")
    if not _is_array(total_num_tokens) and not _is_array(coeff):
        t = float(total_num_tokens)
        return np.float32(num_experts * float(coeff) / (topk * t * t))
    t = jnp.asarray(total_num_tokens).astype(jnp.float32)
    return (np.float32(num_experts) * jnp.asarray(coeff, jnp.float32)) / (np.float32(topk) * t * t)


def check_aux_loss_arrays(probs: jax.Array, tokens_per_expert: jax.Array,
                          num_experts: int) -> None:
    """Shape / dtype rules of ``fused_moe_aux_loss``'s array arguments.

    Raises:
      TypeError: ``probs`` not float32 / bfloat16 / float16; ``tokens_per_expert`` not int16 /
        int32 / int64 / float32 / bfloat16 / float16.
      ValueError: rank-0 ``probs``; its last dim not a multiple of ``num_experts``;
        ``tokens_per_expert`` not of shape ``[cols]``.
    """
    pdtype = getattr(probs, "dtype", None)
    if pdtype is None or jnp.dtype(pdtype) not in [jnp.dtype(d) for d in
                                                   (jnp.float32, jnp.bfloat16, jnp.float16)]:
        raise TypeError(f"probs must be float32, bfloat16 or float16, got dtype {pdtype}")
    if jnp.ndim(probs) == 0:
        raise ValueError("probs must have at least one dimension [*rows, cols], got a scalar")
    cols = int(jnp.shape(probs)[-1])
    if cols % num_experts:
        raise ValueError(
            f"probs' last dim (cols={cols}) must be a multiple of num_experts={num_experts}")
    tdtype = getattr(tokens_per_expert, "dtype", None)
    if tdtype is None or jnp.dtype(tdtype) not in [jnp.dtype(d) for d in _AUX_TPE_DTYPES]:
        raise TypeError("tokens_per_expert must be int16/int32/int64/float32/bfloat16/float16, "
                        f"got dtype {tdtype}")
    if tuple(jnp.shape(tokens_per_expert)) != (cols,):
        raise ValueError(f"tokens_per_expert must have shape [cols]=({cols},) (probs' last dim), "
                         f"got {tuple(jnp.shape(tokens_per_expert))}")


def fused_moe_aux_loss(
    probs: jax.Array,
    tokens_per_expert: jax.Array,
    total_num_tokens: int | jax.Array,
    num_experts: int,
    topk: int,
    coeff: float | jax.Array,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Pure-JAX ``fused_moe_aux_loss`` (the public wrapper in jax_router.aux_loss documents it).

    ``E * coeff / (topk * T^2) * sum_c (sum_r probs[r, c]) * tokens_per_expert[c]`` as a float32
    scalar; column sums accumulate in float32; ``tokens_per_expert`` gets no gradient.
    """
    C = aux_loss_scale(total_num_tokens, num_experts, topk, coeff)
    check_aux_loss_arrays(probs, tokens_per_expert, num_experts)
    p = probs.astype(jnp.float32)
    colsum = jnp.sum(p, axis=tuple(range(p.ndim - 1)))
    if axis_name is not None:
        colsum = jax.lax.psum(colsum, axis_name)
    tpe = jax.lax.stop_gradient(tokens_per_expert).astype(jnp.float32)
    return C * jnp.sum(colsum * tpe)


__all__ += ["fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss"]



# ---- quantile balancing (docs/semantics.md#qb) --------------------------------------------------


def qb_bins(s: jax.Array, cutoff: jax.Array, bin_bounds: jax.Array, num_bins: int) -> jax.Array:
    """int32 bins ``clamp(floor(((cutoff - s) - lower) * scale), 0, num_bins - 1)`` of every
    expert of every row, NaN to bin 0; ``scale = float32(num_bins) / (upper - lower)``."""
    bounds = bin_bounds.astype(jnp.float32)
    lower = bounds[0]
    scale = jnp.float32(num_bins) / (bounds[1] - lower)
    v = ((cutoff[..., None] - s) - lower) * scale
    inside = jnp.where(v >= 1.0, jnp.minimum(v, jnp.float32(num_bins - 1)), 0.0)
    return jnp.where(v >= num_bins, num_bins - 1, jnp.floor(inside).astype(jnp.int32))


def qb_core(opts: RouteOptions, num_bins: int, logits: jax.Array, expert_bias: jax.Array | None,
            bin_bounds: jax.Array, histogram: jax.Array | None):
    """Quantile-balancing routing for validated options (``options.qb_options``).

    Returns ``(idx, p, cutoff, histogram)``: int32 ``[*lead, k]`` ids in the documented order,
    float32 ``[*lead, k]`` weights before ``scaling_factor`` (differentiable w.r.t. ``logits``),
    float32 ``[*lead]`` cutoff (the ``(k + 1)``-th selection score) and the int32
    ``[E, num_bins]`` histogram: the given one (zeros for None) plus this call's counts.
    """
    k, E = opts.topk, opts.num_experts
    s = activation(ScoreFunction.SIGMOID, logits.astype(jnp.float32))
    z = s + expert_bias.astype(jnp.float32) if expert_bias is not None else s
    z = jax.lax.stop_gradient(z)
    ranked = spec_top_k(z, k + 1)
    idx = ranked[..., :k]
    s_sel = _take(s, idx)
    p = _normalize(s_sel) if k > 1 else s_sel
    cutoff = _take(z, ranked[..., k:])[..., 0]
    bins = qb_bins(jax.lax.stop_gradient(s), cutoff, bin_bounds, num_bins).reshape(-1, E)
    base = jnp.zeros((E, num_bins), jnp.int32) if histogram is None else histogram
    experts = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), bins.shape)
    hist = base.at[experts.reshape(-1), bins.reshape(-1)].add(1)
    return idx, p, cutoff, hist


def route_topk_qb(logits: jax.Array, topk: int, expert_bias: jax.Array | None,
                  bin_bounds: jax.Array, num_bins: int, histogram: jax.Array | None = None, *,
                  scaling_factor: float | None = None, index_dtype: DTypeLike = jnp.int32,
                  score_function: ScoreFunctionLike = "sigmoid", use_pre_softmax: bool = False,
                  num_groups: int | None = None, group_topk: int | None = None):
    """Pure-JAX ``jax_router.route_topk_qb``: same arguments (without ``implementation``),
    outputs and errors. Returns ``(topk_weights, topk_indices, cutoff, histogram)``."""
    from .options import qb_inputs

    opts, nb, logits, expert_bias, bin_bounds, histogram = qb_inputs(
        logits, topk, expert_bias, bin_bounds, num_bins, histogram, scaling_factor,
        score_function, use_pre_softmax, num_groups, group_topk)
    index_dtype = index_dtype_of(index_dtype, opts.num_experts, "index_dtype")
    return qb_weights_and_indices(opts, nb, index_dtype, logits, expert_bias, bin_bounds,
                                  histogram)


def qb_weights_and_indices(opts, num_bins, index_dtype, logits, expert_bias, bin_bounds,
                           histogram):
    """``route_topk_qb`` for validated options (the public function's fallback runs this)."""
    idx, p, cutoff, hist = qb_core(opts, num_bins, logits, expert_bias, bin_bounds, histogram)
    return opts.scaling_factor * p, idx.astype(index_dtype), cutoff, hist


def fused_topk_with_score_function_qb(
        logits: jax.Array, topk: int, expert_bias: jax.Array | None, bin_bounds: jax.Array,
        num_bins: int, histogram: jax.Array | None = None, scaling_factor: float | None = None,
        routing_map_format: RoutingMapFormatLike = "bytemap",
        topk_indices: jax.Array | None = None, topk_indices_dtype: DTypeLike | None = None, *,
        score_function: ScoreFunctionLike = "sigmoid", use_pre_softmax: bool = False,
        num_groups: int | None = None, group_topk: int | None = None):
    """Pure-JAX ``jax_router.fused_topk_with_score_function_qb``: same arguments (without
    ``implementation``), outputs and errors. Returns ``(probs, routing_output, cutoff,
    histogram)``."""
    from .options import qb_inputs

    opts, nb, logits, expert_bias, bin_bounds, histogram = qb_inputs(
        logits, topk, expert_bias, bin_bounds, num_bins, histogram, scaling_factor,
        score_function, use_pre_softmax, num_groups, group_topk)
    topk_indices = as_array(topk_indices)
    fmt = routing_map_format_of(routing_map_format)
    index_dtype = dense_index_dtype(opts, logits, fmt, topk_indices, topk_indices_dtype)
    return qb_probs_and_routing(opts, nb, fmt, index_dtype, logits, expert_bias, bin_bounds,
                                histogram)


def qb_probs_and_routing(opts, num_bins, fmt, index_dtype, logits, expert_bias, bin_bounds,
                         histogram):
    """``fused_topk_with_score_function_qb`` for validated options (the fallback runs this)."""
    idx, p, cutoff, hist = qb_core(opts, num_bins, logits, expert_bias, bin_bounds, histogram)
    probs = scatter_rows(idx, opts.scaling_factor * p, opts.num_experts, logits.dtype)
    if index_dtype is not None:
        return probs, idx.astype(index_dtype), cutoff, hist
    routing_map = scatter_rows(idx, jnp.ones(idx.shape, jnp.bool_), opts.num_experts, jnp.bool_)
    if fmt == RoutingMapFormat.BITMAP_U8:
        routing_map = pack_bitmap(routing_map)
    return probs, routing_map, cutoff, hist


# --- Dispatch (docs/semantics.md#dispatch): the argsort-based definition of the plan ----------


def dispatch_plan(topk_indices: jax.Array, num_experts: int, *, capacity: int | None = None):
    """``jax_router.dispatch_plan`` by a stable argsort of the flat expert ids (the definition).

    Ids outside ``[0, num_experts)`` are dropped (position -1, not counted); their rows, at the
    end of the buffer when there is no capacity, stay empty.
    """
    from .plan import DispatchPlan, plan_options

    topk_indices = as_array(topk_indices)
    o = plan_options(topk_indices, num_experts, capacity)
    E, n = o.num_experts, o.num_tokens * o.topk
    flat = topk_indices.reshape(n)
    # validity in the ids' own dtype: an int64 id such as 2^32 must not wrap into [0, E)
    valid = flat >= 0
    if E <= jnp.iinfo(flat.dtype).max:
        valid = valid & (flat < E)
    key = jnp.where(valid, flat.astype(jnp.int32), E)  # E: dropped, sorts last
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sorted_key = key[order]
    counts = jnp.zeros((E + 1,), jnp.int32).at[key].add(1)
    starts = jnp.cumsum(counts) - counts  # exclusive scan, [E + 1]
    p = jnp.arange(n, dtype=jnp.int32)
    rank = p - starts[sorted_key]  # (token, slot)'s place among its expert's
    if o.capacity is None:
        row, kept = p, sorted_key < E
    else:
        row, kept = sorted_key * o.capacity + rank, (sorted_key < E) & (rank < o.capacity)
    positions = jnp.zeros((n,), jnp.int32).at[order].set(jnp.where(kept, row, -1))
    source = jnp.full((o.num_rows,), -1, jnp.int32).at[jnp.where(kept, row, o.num_rows)].set(
        order, mode="drop")
    return DispatchPlan(counts[:E], positions.reshape(topk_indices.shape), source, o.capacity)


def permute(x: jax.Array, plan) -> jax.Array:
    """``jax_router.permute``: ``rows[r] = x[source[r] // topk]`` (0 for an empty row)."""
    from .plan import check_permute

    x, plan = check_permute(x, plan)
    H = x.shape[-1]
    xf = x.reshape(-1, H)
    if xf.shape[0] == 0:
        return jnp.zeros((plan.num_rows, H), x.dtype)
    src = plan.source
    rows = xf[jnp.maximum(src, 0) // plan.topk]
    return jnp.where((src >= 0)[:, None], rows, jnp.zeros((), x.dtype))


def unpermute(rows: jax.Array, plan, topk_weights: jax.Array) -> jax.Array:
    """``jax_router.unpermute``: ``out[t] = sum_j w[t, j] * rows[positions[t, j]]`` over kept
    slots, in float32, slot by slot (``j = 0 .. topk-1``), cast to ``rows.dtype``."""
    from .plan import check_unpermute

    rows, plan, topk_weights = check_unpermute(rows, plan, topk_weights)
    H, k = rows.shape[-1], plan.topk
    pos = plan.positions.reshape(-1, k)
    w = topk_weights.reshape(-1, k).astype(jnp.float32)
    acc = jnp.zeros((pos.shape[0], H), jnp.float32)
    if rows.shape[0] > 0:
        for j in range(k):
            r = rows[jnp.maximum(pos[:, j], 0)].astype(jnp.float32)
            acc = jnp.where((pos[:, j] >= 0)[:, None], acc + w[:, j, None] * r, acc)
    return acc.astype(rows.dtype).reshape(plan.lead_shape + (H,))
