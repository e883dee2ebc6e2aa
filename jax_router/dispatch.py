"""Dispatch without a sort (docs/semantics.md#dispatch): plan, permute and combine.

``dispatch_plan`` turns the dense ``[*lead, topk]`` expert ids that ``route_topk`` returns into a
``DispatchPlan``: tokens per expert, the expert-major buffer row of each (token, slot), and the
source of each buffer row. ``permute`` gathers the tokens into that buffer, ``unpermute`` brings
the experts' outputs back and combines them with the routing weights.
"""

from __future__ import annotations

import jax

from . import reference
from .plan import DispatchPlan


def dispatch_plan(topk_indices: jax.Array, num_experts: int, *, capacity: int | None = None,
                  implementation: str | None = None) -> DispatchPlan:
    """The dispatch plan of ``topk_indices`` (``[*lead, topk]`` int16 / int32 / int64).

    Buffer layout: experts in ascending order; within an expert, (token, slot) pairs in
    ascending flat order ``token * topk + slot`` (stable). Without ``capacity`` the buffer has
    ``R = T * topk`` rows and expert ``e`` occupies rows ``[sum(tpe[:e]), sum(tpe[:e+1]))``;
    with ``capacity = C`` it has ``R = E * C`` rows, expert ``e`` owns ``[e*C, (e+1)*C)`` and
    its pairs beyond the first ``C`` are dropped (position -1), in token order (MaxText /
    Megatron style). Ids outside ``[0, num_experts)`` are dropped and not counted.
    """
    del implementation
    return reference.dispatch_plan(topk_indices, num_experts, capacity=capacity)


def permute(x: jax.Array, plan: DispatchPlan, *, implementation: str | None = None) -> jax.Array:
    """``x [*lead, H]`` -> the expert-major buffer ``[R, H]``; empty rows are 0."""
    del implementation
    return reference.permute(x, plan)


def unpermute(rows: jax.Array, plan: DispatchPlan, topk_weights: jax.Array, *,
              implementation: str | None = None) -> jax.Array:
    """The buffer ``[R, H]`` -> ``[*lead, H]``: ``out[t] = sum_j w[t, j] * rows[positions[t, j]]``
    over kept slots, accumulated in float32 in slot order, cast to ``rows.dtype``."""
    del implementation
    return reference.unpermute(rows, plan, topk_weights)
