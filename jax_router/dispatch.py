"""Dispatch without a sort (docs/semantics.md#dispatch): plan, permute and combine.

``dispatch_plan`` turns the dense ``[*lead, topk]`` expert ids that ``route_topk`` returns into a
``DispatchPlan``: tokens per expert, the expert-major buffer row of each (token, slot), and the
source of each buffer row. ``permute`` gathers the tokens into that buffer, ``unpermute`` brings
the experts' outputs back and combines them with the routing weights.

Path to the kernels: the public functions validate (plan.py), then call the FFI targets
``jax_router_dispatch_plan`` / ``jax_router_permute`` / ``jax_router_unpermute`` (and
``jax_router_unpermute_bwd`` for the weights' gradient) through ``jax.ffi.ffi_call``; they run
``ffi/dispatch_cpu.cc`` or ``ffi/dispatch_cuda.cu``, whose arithmetic is ``ffi/dispatch_math.h``.
``permute`` and ``unpermute`` are ``jax.custom_vjp`` functions whose backward passes are each
other's forward patterns. The pure-JAX definition is ``jax_router.reference``
(``implementation="xla"``).

These custom calls are not batch-partitionable: under ``jax.jit`` with token-sharded inputs
XLA gathers their operands and runs them replicated, which gives the global plan (the same
as on one device). Inside ``shard_map`` each device plans and moves its own tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import _ffi, reference
from .options import as_array
from .plan import DispatchPlan, PlanOptions, check_permute, check_unpermute, plan_options
from .router import autodiff_guard

# The plan kernels' tiling (ffi/dispatch_math.h): flat (token, slot) entries per tile, and the
# number of experts past which the CUDA rank tables live in the workspace. The plan call's
# workspace holds the counts per (tile, expert) and per (group of tiles, expert), the expert
# starts, and past that number of experts one table per tile. A test compares
# plan_workspace_size with the compiled modules' dispatch_plan_workspace_size.
PLAN_TILE = 2048
_PLAN_MIN_SHARED_WARPS = max(1, PLAN_TILE // (32 * 64))  # a lane holds at most 64 entries
_PLAN_SHARED_MAX_EXPERTS = (12288 - 32 - PLAN_TILE) // (4 + _PLAN_MIN_SHARED_WARPS)
_PLAN_CLUSTER_GROUP, _PLAN_CLUSTER_MAX_TILES = 8, 256  # groups of at most 8 tiles up to 256 tiles
_NO_CAPACITY = -1  # the capacity attribute's "none" (ffi/dispatch_math.h kNoCapacity)


def plan_workspace_size(num_entries: int, num_experts: int) -> int:
    """int32 elements of the plan call's workspace (ffi/dispatch_math.h plan_workspace_size)."""
    tiles = -(-num_entries // PLAN_TILE)
    group = 1
    while group * group < tiles:
        group *= 2
    if tiles <= _PLAN_CLUSTER_MAX_TILES:
        group = min(group, _PLAN_CLUSTER_GROUP)
    groups = -(-tiles // group)
    global_tables = tiles if num_experts > _PLAN_SHARED_MAX_EXPERTS else 0
    return (tiles + groups + 1 + global_tables) * num_experts


def _use_kernels(implementation: str | None) -> bool:
    return _ffi.use_kernels(implementation, _ffi.DISPATCH_TARGETS, "dispatch kernels")


# ---- FFI calls -----------------------------------------------------------------------------


def _result(ref: jax.Array, shape: tuple[int, ...], dtype: Any) -> Any:
    """The type of an output: ``ref``'s (so varying manual axes carry through ``shard_map``),
    with ``shape`` and ``dtype`` and every dim unsharded (the calls are not partitioned)."""
    t = jax.typeof(ref)
    sharding = getattr(t, "sharding", None)
    if sharding is None:
        return t.update(shape=tuple(shape), dtype=jnp.dtype(dtype))
    return t.update(shape=tuple(shape), dtype=jnp.dtype(dtype),
                    sharding=sharding.update(spec=P(*([None] * len(shape)))))


def _vma(x) -> frozenset:
    return frozenset(getattr(jax.typeof(x), "vma", frozenset()))


def _same_vma(*args):
    """``args`` made varying over the union of their manual axes (inside ``shard_map``, a plan
    built outside it meets tokens that vary per device); unchanged elsewhere."""
    union = frozenset().union(*(_vma(a) for a in args))
    if not union:
        return args
    return tuple(a if _vma(a) == union else
                 jax.lax.pcast(a, tuple(sorted(union - _vma(a))), to="varying") for a in args)


def _call(target: str, results, *args, **attrs):
    args = _same_vma(*args)
    return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args, **attrs)


def _no_weights(ref: jax.Array) -> jax.Array:
    """The zero-size placeholder for "unweighted", typed like ``ref``."""
    return ref.reshape(-1)[:0].astype(jnp.float32)


def _ffi_plan(topk_indices: jax.Array, o: PlanOptions):
    E, n = o.num_experts, o.num_tokens * o.topk
    results = (_result(topk_indices, (E,), jnp.int32),
               _result(topk_indices, topk_indices.shape, jnp.int32),
               _result(topk_indices, (o.num_rows,), jnp.int32),
               _result(topk_indices, (plan_workspace_size(n, E),), jnp.int32))
    tpe, positions, source, _ = _call(
        _ffi.DISPATCH_PLAN_TARGET, results, topk_indices, num_experts=E,
        capacity=_NO_CAPACITY if o.capacity is None else o.capacity)
    return tpe, positions, source


def _ffi_permute(x2: jax.Array, source: jax.Array, weights: jax.Array | None, topk: int):
    """rows [R, H] = x2 [T, H] gathered by source (times weights[source] when given)."""
    out = _result(x2, (source.shape[0], x2.shape[1]), x2.dtype)
    w = _no_weights(x2) if weights is None else weights
    return _call(_ffi.PERMUTE_TARGET, out, x2, source, w, topk=topk)


def _ffi_unpermute(rows: jax.Array, positions: jax.Array, weights: jax.Array | None):
    """out [T, H] = sum over slots of weights * rows[positions] (weights 1 when None)."""
    T, k = positions.shape
    out = _result(rows, (T, rows.shape[1]), rows.dtype)
    w = _no_weights(rows) if weights is None else weights
    return _call(_ffi.UNPERMUTE_TARGET, out, rows, positions, w, topk=k)


def _ffi_unpermute_bwd(dout: jax.Array, rows: jax.Array, positions: jax.Array, w_dtype):
    """dweights [T, k] = dot(dout[t], rows[positions[t, j]]) in the fixed order."""
    out = _result(dout, positions.shape, w_dtype)
    return _call(_ffi.UNPERMUTE_BWD_TARGET, out, dout, rows, positions, topk=positions.shape[1])


# ---- differentiable kernels ----------------------------------------------------------------


def _spec(x) -> Any:
    """``x``'s PartitionSpec, or None where its type carries none."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    return None if sharding is None else sharding.spec


def _resharded(v: jax.Array, spec: Any) -> jax.Array:
    """A cotangent given the sharding of its primal input: a custom_vjp's backward must return
    exactly the input types, and with explicit mesh axes a token-sharded ``x`` gets its gradient
    from a replicated (unpartitioned) call."""
    def axes(sp):  # trailing unsharded dims do not matter: P() is P(None, None)
        t = tuple(sp) if sp is not None else ()
        while t and t[-1] is None:
            t = t[:-1]
        return t

    if spec is None or axes(_spec(v)) == axes(spec):
        return v
    return jax.sharding.reshard(v, spec)


@dataclasses.dataclass(frozen=True)
class _Static:
    topk: int
    weights_dtype: Any = None  # unpermute: the dtype of topk_weights (and of its cotangent)
    in_specs: tuple = ()  # the differentiable inputs' PartitionSpecs (x; or rows, weights)


def _permute_impl(s: _Static, x2, source, positions):
    del positions
    return _ffi_permute(x2, source, None, s.topk)


def _permute_fwd(s, x2, source, positions):
    return _permute_impl(s, x2, source, positions), (source, positions)


def _permute_bwd(s, residuals, drows):
    # d x[t] = sum over kept slots of d rows[positions[t, j]]: an unweighted combine
    source, positions = residuals
    del source
    return _resharded(_ffi_unpermute(drows, positions, None), s.in_specs[0]), None, None


_permute = jax.custom_vjp(_permute_impl, nondiff_argnums=(0,))
_permute.defvjp(_permute_fwd, _permute_bwd)


def _unpermute_impl(s: _Static, rows, w2, source, positions):
    del source
    return _ffi_unpermute(rows, positions, w2)


def _unpermute_fwd(s, rows, w2, source, positions):
    return _unpermute_impl(s, rows, w2, source, positions), (rows, w2, source, positions)


def _unpermute_bwd(s, residuals, dout):
    rows, w2, source, positions = residuals
    # d rows[r] = w[source[r]] * dout[source[r] / k]: a weighted permute
    drows = _ffi_permute(dout, source, w2.reshape(-1), s.topk)
    dw = _ffi_unpermute_bwd(dout, rows, positions, s.weights_dtype)
    return _resharded(drows, s.in_specs[0]), _resharded(dw, s.in_specs[1]), None, None


_unpermute = jax.custom_vjp(_unpermute_impl, nondiff_argnums=(0,))
_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


# ---- public functions ----------------------------------------------------------------------


def dispatch_plan(topk_indices: jax.Array, num_experts: int, *, capacity: int | None = None,
                  implementation: str | None = None) -> DispatchPlan:
    """The dispatch plan of ``topk_indices`` (``[*lead, topk]`` int16 / int32 / int64).

    Buffer layout: experts in ascending order; within an expert, (token, slot) pairs in
    ascending flat order ``token * topk + slot`` (stable). Without ``capacity`` the buffer has
    ``R = T * topk`` rows and expert ``e`` occupies rows ``[sum(tpe[:e]), sum(tpe[:e+1]))``;
    with ``capacity = C`` it has ``R = E * C`` rows, expert ``e`` owns ``[e*C, (e+1)*C)`` and
    its pairs beyond the first ``C`` are dropped (position -1), in token order (MaxText /
    Megatron style). Ids outside ``[0, num_experts)`` are dropped and not counted; without
    capacity their rows (the last ones) stay empty.

    The kernels count instead of sorting: counts per block of entries, a scan over blocks and
    experts, then stable ranks within each block (docs/semantics.md#dispatch). The plan is
    integer data: exact, and the same on every platform and every run.

    Args:
      topk_indices: ``[*lead, topk]`` int16 / int32 / int64 expert ids (``route_topk``'s).
      num_experts: ``E >= 1``, a static int.
      capacity: None, or the static per-expert capacity ``C >= 0``. Keyword only.
      implementation: None (the kernels where this backend has them, else pure JAX), "ffi"
        (require the kernels) or "xla" (pure JAX, ``jax_router.reference``). Keyword only.

    Returns:
      A ``DispatchPlan`` (a pytree): ``tokens_per_expert int32[E]``, ``positions
      int32[*lead, topk]``, ``source int32[R]`` and the static ``capacity``.

    Raises:
      TypeError / ValueError naming the argument, at trace time: a non-integer or scalar
      ``topk_indices``, int64 while ``jax_enable_x64`` is off, ``num_experts < 1``, a negative
      or non-int ``capacity``, a plan of 2^31 rows or more, an unknown ``implementation``.
    """
    topk_indices = as_array(topk_indices)
    o = plan_options(topk_indices, num_experts, capacity)
    if not _use_kernels(implementation):
        return reference.dispatch_plan(topk_indices, num_experts, capacity=capacity)
    # Integer data all through: under jax.grad the ids (route_topk's, say) carry an
    # instantiated zero tangent, which ffi_call would refuse to differentiate; stop_gradient
    # makes it symbolic, so the plan is a constant of the differentiated function.
    tpe, positions, source = _ffi_plan(jax.lax.stop_gradient(topk_indices), o)
    # with explicit mesh axes: positions keep the ids' token sharding (the call ran replicated)
    return DispatchPlan(tpe, _resharded(positions, _spec(topk_indices)), source, o.capacity)


def permute(x: jax.Array, plan: DispatchPlan, *, implementation: str | None = None) -> jax.Array:
    """``x [*lead, H]`` -> the expert-major buffer ``[R, H]``: ``rows[r] = x[source[r] //
    topk]``, empty rows 0 (a copy of the bits).

    Differentiable in ``x`` (reverse mode with the kernels): the gradient is the unweighted
    combine of the rows' cotangent, accumulated in float32 in slot order and cast to ``x``'s
    dtype. Float32 / bfloat16 / float16. Raises TypeError / ValueError naming ``x`` or
    ``plan`` when they do not fit, before anything runs.
    """
    x, plan = check_permute(x, plan)
    if not _use_kernels(implementation):
        return reference.permute(x, plan)
    H = x.shape[-1]
    x2 = x.reshape(math.prod(plan.lead_shape), H)
    pos2 = plan.positions.reshape(-1, plan.topk)
    return autodiff_guard(_permute, _Static(plan.topk, in_specs=(_spec(x2),)), x2, plan.source,
                          pos2)


def unpermute(rows: jax.Array, plan: DispatchPlan, topk_weights: jax.Array, *,
              implementation: str | None = None) -> jax.Array:
    """The buffer ``[R, H]`` -> ``[*lead, H]``: ``out[t] = sum_j w[t, j] * rows[positions[t, j]]``
    over kept slots, accumulated in float32 in slot order from +0 (each product rounded, then
    each sum), cast to ``rows.dtype``.

    Differentiable in ``rows`` and ``topk_weights`` (reverse mode with the kernels): ``d rows[r]
    = w[source[r]] * dout[token]`` (float32 product cast to the rows' dtype, 0 for empty
    rows), ``d w[t, j] = dot(dout[t], rows[positions[t, j]])`` in the fixed order of
    docs/semantics.md#dispatch, cast to ``topk_weights``' dtype (0 for dropped slots). Raises
    TypeError / ValueError naming ``rows``, ``plan`` or ``topk_weights``, before anything runs.
    """
    rows, plan, topk_weights = check_unpermute(rows, plan, topk_weights)
    if not _use_kernels(implementation):
        return reference.unpermute(rows, plan, topk_weights)
    k = plan.topk
    pos2 = plan.positions.reshape(-1, k)
    w2 = topk_weights.reshape(-1, k)
    static = _Static(k, jnp.dtype(topk_weights.dtype), (_spec(rows), _spec(w2)))
    out = autodiff_guard(_unpermute, static, rows, w2, plan.source, pos2)
    out = out.reshape(plan.lead_shape + (rows.shape[1],))
    # with explicit mesh axes: the output keeps the weights' token sharding (reshard's
    # transpose brings the cotangent back to the replicated call)
    w_spec = _spec(topk_weights)
    if w_spec is not None:
        w_spec = tuple(w_spec) + (None,) * (topk_weights.ndim - len(w_spec))
        out = _resharded(out, P(*w_spec[:-1], None))
    return out
