"""Auxiliary (load-balancing) loss helpers with TransformerEngine's signatures (docs/semantics.md#aux-loss).

``fused_compute_score_for_moe_aux_loss`` runs the FFI targets ``jax_router_aux_scores_fwd`` /
``jax_router_aux_scores_bwd`` (ffi/aux_loss_cpu.cc) where the current backend has them, inside a
``jax.custom_vjp``; elsewhere it falls back to jax_router.reference.

``fused_moe_aux_loss`` is written in JAX ops on every backend: a float32 column sum over the
token rows, a dot with ``tokens_per_expert`` and a scale. That is one memory-bound reduction
XLA fuses well, and because XLA sees the reduction it partitions it itself: with the token rows
sharded (``NamedSharding`` under ``jax.jit``) each device sums its rows and XLA inserts the
all-reduce, so the result is the GLOBAL loss, never a per-shard one. (A custom call would need
its own partitioning rule and an explicit all-reduce to get the same.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi, custom_calls, reference
from .options import (
    aux_scores_options,
    RoutingMapFormat,
    RoutingMapFormatLike,
    ScoreFunction,
    ScoreFunctionLike,
    as_array,
    map_format_attr,
    score_function_attr,
    static_int,
)
from .router import _aval, autodiff_guard


@dataclasses.dataclass(frozen=True)
class _AuxCall:
    """Static part of one aux-score call (the custom_vjp's non-differentiable argument)."""

    num_experts: int
    topk: int
    score_function: ScoreFunction
    map_format: RoutingMapFormat


def _scores_fwd_call(call: _AuxCall, logits):
    lead, E = logits.shape[:-1], call.num_experts
    bitmap = call.map_format == RoutingMapFormat.BITMAP_U8
    map_shape = lead + (((E + 7) // 8) if bitmap else E,)
    out_types = (
        _aval(logits, lead + (E,), jnp.float32),
        _aval(logits, map_shape, jnp.uint8 if bitmap else jnp.bool_),
    )
    # Typed as AuxAttrs (ffi/ffi_contract.h).
    scores, routing_map = custom_calls.ffi_aux_scores_forward(
        out_types, logits,
        dict(topk=np.int64(call.topk), score_function=score_function_attr(call.score_function),
             map_format=map_format_attr(call.map_format)))
    return routing_map, scores


def _scores_impl(call: _AuxCall, logits):
    return _scores_fwd_call(call, logits)


def _scores_fwd(call: _AuxCall, logits):
    # The logits are the only residual: the backward recomputes the activation row from them.
    return _scores_fwd_call(call, logits), logits


def _scores_bwd(call: _AuxCall, logits, cotangents):
    _, g_scores = cotangents  # the map is boolean / integer: its cotangent is float0
    grad_logits = autodiff_guard(
        custom_calls.ffi_aux_scores_backward, _aval(logits, logits.shape, logits.dtype),
        g_scores.astype(jnp.float32), logits,
        dict(score_function=score_function_attr(call.score_function)))
    return (grad_logits,)


_aux_scores = jax.custom_vjp(_scores_impl, nondiff_argnums=(0,))
_aux_scores.defvjp(_scores_fwd, _scores_bwd)


def _use_aux_kernels(implementation: str | None) -> bool:
    return _ffi.use_kernels(implementation,
                            (_ffi.AUX_SCORES_FWD_TARGET, _ffi.AUX_SCORES_BWD_TARGET),
                            "aux-score kernels")


def fused_compute_score_for_moe_aux_loss(
    logits: jax.Array,
    topk: int,
    score_function: ScoreFunctionLike,
    routing_map_format: RoutingMapFormatLike = "bytemap",
    *,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense scores and top-k map for the auxiliary loss; returns ``(routing_map, scores)``.

    Args:
      logits: ``[*lead, E]`` float32 / bfloat16 / float16 router logits.
      topk: experts marked per token, ``1 <= topk <= E``.
      score_function: "softmax" | "sigmoid" | "sqrtsoftplus", or an enum member with one of
        those names (matched by name, as in ``fused_topk_with_score_function``).
      routing_map_format: "bytemap" (``bool[*lead, E]``) or "bitmap_u8"
        (``uint8[*lead, ceil(E/8)]``, bit ``e % 8`` of byte ``e // 8``, padding bits 0); a
        ``RoutingMapFormat``, an enum member of that name, or 0 / 1 also work.
      implementation: None (kernels where this backend has them, else pure JAX), "ffi", "xla".

    Returns:
      ``routing_map``: the ``topk`` largest ``scores`` of each row (ties to the lower expert id).
      ``scores``: float32 ``[*lead, E]`` for every logits dtype: ``softmax(x)`` over all E, or
      for sigmoid / sqrtsoftplus ``s / (sum_{all E} s + 1e-20)`` with ``s = act(x)``, whatever
      ``topk``. No expert bias, groups or scaling.

    The gradient reaches ``logits`` through ``scores`` (the map has none): softmax
    ``dx = s (g - sum g s)``; sigmoid / sqrtsoftplus the normalisation backward with sums over
    all E, then the activation's derivative. It is returned in the logits dtype.

    ``logits`` may be anything ``jnp.asarray`` takes; ``topk`` is static. Reverse-mode autodiff
    only (forward mode and second order raise, except with ``implementation="xla"``).

    Raises:
      TypeError / ValueError naming the argument, at trace time: bad logits dtype or rank, a
      non-int (or traced) ``topk`` or one outside ``[1, E]``, an unknown score_function,
      routing_map_format or implementation, ``implementation="ffi"`` in a build without the
      aux-score kernels.
    """
    logits = as_array(logits)
    opts, fmt = aux_scores_options(logits, topk, score_function, routing_map_format)
    if not _use_aux_kernels(implementation):
        return reference.aux_map_and_scores(opts, fmt, logits)
    call = _AuxCall(opts.num_experts, opts.topk, opts.score_function, fmt)
    return autodiff_guard(_aux_scores, call, custom_calls.whole_last_dim(logits))


def fused_moe_aux_loss(
    probs: jax.Array,
    tokens_per_expert: jax.Array,
    total_num_tokens: int | jax.Array | None = None,
    num_experts: int | None = None,
    topk: int | None = None,
    coeff: float | jax.Array | None = None,
    *,
    axis_name: Hashable | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Load-balancing auxiliary loss (TransformerEngine's ``fused_moe_aux_loss``).

    ``loss = E * coeff / (topk * T^2) * sum_c (sum_r probs[r, c]) * tokens_per_expert[c]``
    with ``E = num_experts`` and ``T = total_num_tokens``.

    Two call forms, both TransformerEngine's:

    * ``fused_moe_aux_loss(probs, tokens_per_expert, total_num_tokens, num_experts, topk,
      coeff)`` (its PyTorch router and older JAX releases);
    * ``fused_moe_aux_loss(probs, tokens_per_expert, topk, coeff)`` (its current JAX router;
      ``topk=`` / ``coeff=`` by keyword too): ``T`` is the number of token rows of ``probs``
      (times the size of ``axis_name`` when given) and ``E`` its last dim.

    Args:
      probs: ``[rows, cols]`` (or ``[*lead, cols]``; every leading dim is a token dim)
        float32 / bfloat16 / float16; ``cols`` is a multiple of ``num_experts`` (the
        sequence-level aux loss packs sequences along the columns).
      tokens_per_expert: ``[cols]`` int16 / int32 / int64 / float32 / bfloat16 / float16
        (global counts). It gets no gradient.
      total_num_tokens: positive int, or a scalar JAX array (e.g. computed under jit).
        Omitted (with ``num_experts``) in the four-argument form.
      num_experts: static int ``E >= 1``.
      topk: static int in ``[1, num_experts]``.
      coeff: float (or a float scalar array).
      axis_name: only inside ``shard_map`` with the token rows split over a manual mesh axis:
        the column sums are ``psum``-ed over it, so every device gets the global loss. Not
        needed under ``jax.jit`` with ``NamedSharding`` (XLA reduces across devices itself).
      implementation: None, "ffi" or "xla" (validated for uniformity with the other entry
        points; every choice runs the same JAX reduction, see the module docstring).

    Returns:
      A float32 scalar. Unlike TransformerEngine (which returns the probs dtype) the loss is
      float32 for every probs dtype: the column sums are accumulated in float32 and a bf16 /
      f16 scalar would round the loss to 8 / 11 bits before it joins a float32 training loss.
      Cast it if the probs dtype is wanted. The gradient w.r.t. ``probs`` is
      ``C * tokens_per_expert[c] * g`` in the probs dtype.

    Under ``jax.jit`` with the token rows sharded this is the GLOBAL loss (the partial column
    sums are all-reduced by XLA), equal to the single-device result.

    Raises:
      TypeError / ValueError naming the argument: bad dtypes, ``cols % num_experts != 0``,
      ``tokens_per_expert`` not of shape ``[cols]``, ``topk`` outside ``[1, num_experts]``,
      ``total_num_tokens <= 0``, a non-finite ``coeff``, a non-int ``num_experts`` / ``topk`` /
      ``total_num_tokens``, an unknown ``implementation``.
    """
    if implementation not in (None, "ffi", "xla"):
        raise ValueError(f"implementation must be None, 'ffi' or 'xla', got {implementation!r}")
    probs = as_array(probs)
    tokens_per_expert = as_array(tokens_per_expert)
    given = tuple(v is not None for v in (total_num_tokens, num_experts, topk, coeff))
    if given == (True, True, False, False):  # (probs, tokens_per_expert, topk, coeff)
        total_num_tokens, num_experts, topk, coeff = None, None, total_num_tokens, num_experts
    elif given == (True, False, False, True):  # (probs, tokens_per_expert, topk, coeff=...)
        total_num_tokens, topk = None, total_num_tokens
    elif given != (False, False, True, True) and not all(given):
        raise TypeError(
            "fused_moe_aux_loss takes (probs, tokens_per_expert, total_num_tokens, num_experts, "
            "topk, coeff) or (probs, tokens_per_expert, topk, coeff); got total_num_tokens="
            f"{total_num_tokens!r}, num_experts={num_experts!r}, topk={topk!r}, coeff={coeff!r}")
    if total_num_tokens is None:  # the four-argument form: T and E from probs
        if jnp.ndim(probs) == 0:
            raise ValueError("probs must have at least one dimension [*rows, E], got a scalar")
        num_experts = int(jnp.shape(probs)[-1])
        total_num_tokens = int(np.prod(jnp.shape(probs)[:-1], dtype=np.int64))
        if axis_name is not None:  # probs holds this device's rows only
            total_num_tokens = total_num_tokens * jax.lax.psum(1, axis_name)
    static_int(num_experts, "num_experts")
    static_int(topk, "topk")
    return reference.fused_moe_aux_loss(probs, tokens_per_expert, total_num_tokens, num_experts,
                                        topk, coeff, axis_name=axis_name)


__all__ = ["fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss"]
