"""The dispatch plan (docs/semantics.md#dispatch) and the validation of the dispatch ops' arguments.

A ``DispatchPlan`` is what ``dispatch_plan`` returns and ``permute`` / ``unpermute`` read: three
integer arrays and one static option. It is a pytree (the arrays are its leaves), so it passes
through ``jax.jit``, ``shard_map`` and ``jax.lax`` control flow like any tuple of arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from .options import as_array, index_dtype_of, static_int

_INT32_MAX = 2**31 - 1
_ROW_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """Where each (token, slot) goes in the expert-major buffer, and what fills each buffer row.

    Attributes:
      tokens_per_expert: ``int32[E]``, the (token, slot) pairs routed to each expert, counted
        before any capacity drop.
      positions: ``int32[*lead, topk]``, the buffer row of each (token, slot), or -1 when it is
        dropped (by capacity, or because its expert id is outside ``[0, E)``).
      source: ``int32[R]``, the flat ``token * topk + slot`` that fills each buffer row, or -1
        for an empty row.
      capacity: None (``R = T * topk``, experts packed back to back) or the static per-expert
        capacity ``C`` (``R = E * C``, expert ``e`` owns rows ``[e*C, (e+1)*C)``).
    """

    tokens_per_expert: jax.Array
    positions: jax.Array
    source: jax.Array
    capacity: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.shape[0]

    @property
    def topk(self) -> int:
        return self.positions.shape[-1]

    @property
    def num_rows(self) -> int:
        """``R``, the rows of the expert-major buffer."""
        return self.source.shape[0]

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.positions.shape[:-1])


jax.tree_util.register_dataclass(
    DispatchPlan, data_fields=["tokens_per_expert", "positions", "source"],
    meta_fields=["capacity"])


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """``dispatch_plan``'s static options, validated."""

    num_experts: int
    topk: int
    num_tokens: int
    capacity: int | None

    @property
    def num_rows(self) -> int:
        if self.capacity is None:
            return self.num_tokens * self.topk
        return self.num_experts * self.capacity


def plan_options(topk_indices: Any, num_experts: Any, capacity: Any) -> PlanOptions:
    """Validates ``dispatch_plan``'s arguments (TypeError / ValueError naming the argument)."""
    if getattr(topk_indices, "dtype", None) is None:
        raise TypeError("topk_indices must be an int16 / int32 / int64 array [*lead, topk], got "
                        f"{type(topk_indices).__name__}")
    if jnp.ndim(topk_indices) == 0:
        raise ValueError("topk_indices must have at least one dimension [*lead, topk], got a "
                         "scalar")
    E = static_int(num_experts, "num_experts")
    if E < 1:
        raise ValueError(f"num_experts must be >= 1, got {E}")
    index_dtype_of(topk_indices.dtype, 0, "topk_indices dtype")
    k = topk_indices.shape[-1]
    if k < 1:
        raise ValueError(f"topk_indices must have topk >= 1 slots in its last dim, got shape "
                         f"{topk_indices.shape}")
    T = math.prod(topk_indices.shape[:-1])
    if capacity is not None:
        capacity = static_int(capacity, "capacity")
        if capacity < 0:
            raise ValueError(f"capacity must be None or >= 0, got {capacity}")
    opts = PlanOptions(E, k, T, capacity)
    if T * k > _INT32_MAX or opts.num_rows > _INT32_MAX:
        raise ValueError(
            f"the plan's rows are int32: tokens * topk = {T * k} and the buffer's rows "
            f"({opts.num_rows}) must be < 2^31; split the batch")
    return opts


def check_plan(plan: Any, argname: str = "plan") -> DispatchPlan:
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"{argname} must be a DispatchPlan (from jax_router.dispatch_plan), got "
                        f"{type(plan).__name__}")
    return plan


def check_rows_dtype(x: Any, argname: str) -> Any:
    x = as_array(x)
    dtype = getattr(x, "dtype", None)
    if dtype is None or jnp.dtype(dtype) not in [jnp.dtype(d) for d in _ROW_DTYPES]:
        raise TypeError(f"{argname} must be a float32, bfloat16 or float16 array, got "
                        f"{dtype if dtype is not None else type(x).__name__}")
    return x


def check_permute(x: Any, plan: Any) -> tuple[Any, DispatchPlan]:
    plan = check_plan(plan)
    x = check_rows_dtype(x, "x")
    if x.ndim != len(plan.lead_shape) + 1 or tuple(x.shape[:-1]) != plan.lead_shape:
        raise ValueError(f"x must be [*lead, H] with lead = the plan's {plan.lead_shape} (the "
                         f"leading dims of topk_indices), got shape {x.shape}")
    return x, plan


def check_unpermute(rows: Any, plan: Any, topk_weights: Any) -> tuple[Any, DispatchPlan, Any]:
    plan = check_plan(plan)
    rows = check_rows_dtype(rows, "rows")
    topk_weights = check_rows_dtype(topk_weights, "topk_weights")
    if rows.ndim != 2 or rows.shape[0] != plan.num_rows:
        raise ValueError(f"rows must be [R, H] with R = {plan.num_rows} (the plan's buffer "
                         f"rows), got shape {rows.shape}")
    if tuple(topk_weights.shape) != tuple(plan.positions.shape):
        raise ValueError(f"topk_weights must have the plan's shape [*lead, topk] = "
                         f"{tuple(plan.positions.shape)}, got {tuple(topk_weights.shape)}")
    return rows, plan, topk_weights
