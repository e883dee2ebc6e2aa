"""The router's custom calls: their JAX primitives, lowering, vmap and row-wise partitioning.

Each FFI target (``jax_router_fwd``, ``jax_router_bwd`` and the aux-score pair) is bound through
its own primitive (abstract eval = the output types router.py computes, a vmap rule, a lowering). When the
program is partitioned over several devices, the lowering emits a batch-partitionable custom
call: the target is registered with ``jax.ffi.register_ffi_target_as_batch_partitionable`` and
the call carries the frontend attribute ``num_batch_dims`` = the number of token (leading)
dims, plus a Shardy ``sdy.sharding_rule`` saying the same thing to sharding propagation (token
dims shared by every ``[*lead, X]`` buffer, every other dim replicated). XLA's SPMD partitioner
then treats the token dims as batch dims: whatever mesh axes shard them, every device runs the
kernel on its own rows and the outputs keep that sharding; the expert dim (and ``k``) is made
whole first, so an expert-sharded input is gathered, never routed per shard. Nothing runs in
Python at compile time and no mesh axes are named. On one device the lowering is the plain
custom call, exactly as before (this is what ``jax.export`` of an unsharded function records).

XLA's batch partitioner gives an operand or result of rank ``r`` (``n`` batch dims): ``r > n``:
the batch sharding on its leading ``n`` dims, the rest whole; ``r == n``: the batch sharding on
all of its dims; ``r < n``: replicated. The calls are shaped so that this is right for every
buffer:

* logits, outputs, residuals and the aliased ``topk_indices`` buffer are ``[*lead, X]``;
* rank-1 buffers - the ``[E]`` bias and the zero-size ``(0,)`` placeholders (outputs not
  requested, the backward's logits unless pre-softmax) - must be replicated, i.e. ``n >= 2``.
  With 2-D logits (``n == 1``) the lowering therefore reshapes every ``[T, X]`` buffer to
  ``[T, 1, X]`` around the custom call (free bitcasts in the compiled program) and uses
  ``n == 2``;
* a bias batched by ``vmap`` (``[B, E]``) cannot be replicated (each batch member has its own
  row) nor split like the tokens, so the vmap rule broadcasts it to one row per token,
  ``[*lead, E]`` (the handlers accept ``nb`` bias rows, token row ``r`` using row
  ``r / (T / nb)``), which is split with the logits. That costs a ``[*lead, E]`` float32 copy,
  only in that case.

The partitioned custom call XLA builds does not keep the ``topk_indices`` aliasing
(``output_to_operand_aliasing``), so with several devices the indices get their own buffer
(values are the same; a donated buffer can still be reused by XLA at the program level).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax._src import config, dispatch, sharding_impls
from jax._src.custom_partitioning_sharding_rule import (
    ArrayMapping,
    SdyShardingRule,
    sdy_sharding_rule_to_mlir,
)
from jax._src.interpreters import batching
from jax._src.interpreters import mlir as _mlir
from jax.extend.core import Primitive
from jax.interpreters import mlir

from . import _ffi

for _name in (_ffi.FWD_TARGET, _ffi.BWD_TARGET, _ffi.AUX_SCORES_FWD_TARGET,
              _ffi.AUX_SCORES_BWD_TARGET):
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)


def _reshape(ctx, op, aval):
    """MLIR reshape of one value to ``aval``'s shape (a free bitcast after compilation)."""
    if hasattr(_mlir, "reshape"):
        return _mlir.reshape(ctx, op, aval)
    # Releases whose private lowering helpers lack reshape: the StableHLO op itself.
    from jax._src.lib.mlir.dialects import hlo

    out_type = mlir.ir.RankedTensorType.get(aval.shape, mlir.dtype_to_ir_type(aval.dtype))
    return hlo.reshape(out_type, op)


def _num_devices(ctx) -> int:
    axis_context = ctx.module_context.axis_context
    if isinstance(axis_context, sharding_impls.ShardingContext):
        return axis_context.num_devices
    if isinstance(axis_context, sharding_impls.SPMDAxisContext):
        return axis_context.mesh.size
    return 1


def _lowering(target: str, ctx, *operands, target_name, out_types, aliases, attrs,
              bias_operand):
    del target_name, out_types, bias_operand
    plain = jax.ffi.ffi_lowering(target, operand_output_aliases=dict(aliases))
    avals_in, avals_out = list(ctx.avals_in), list(ctx.avals_out)
    n = avals_in[0].ndim - 1  # token dims of the first operand (logits / cotangent)
    if n <= 0 or _num_devices(ctx) <= 1:
        # one device (also what jax.export of an unsharded function records), or one token
        # row: the plain custom call, nothing to partition
        return plain(ctx, *operands, **dict(attrs))
    unit = n == 1
    if unit:  # [T, X] -> [T, 1, X]: rank-1 buffers (bias, placeholders) then have rank < n
        operands = tuple(_reshape(ctx, op, _widen(a)) if a.ndim == 2 else op
                         for op, a in zip(operands, avals_in))
        avals_in = [_widen(a) if a.ndim == 2 else a for a in avals_in]
        wide_out = [_widen(a) if a.ndim == 2 else a for a in avals_out]
        n = 2
    else:
        wide_out = avals_out
    for a in avals_in + wide_out:
        if a.ndim not in (1, n + 1) or (a.ndim > 1 and a.shape[:n] != avals_in[0].shape[:n]):
            raise AssertionError(f"{target}: buffer {a} is neither [*lead, X] nor rank 1")
    inner = ctx.replace(avals_in=avals_in, avals_out=wide_out)
    frontend = mlir.ir_attribute({"num_batch_dims": str(n)})
    results = jax.ffi.ffi_lowering(
        target,
        operand_output_aliases=dict(aliases),
        extra_attributes={"mhlo.frontend_attributes": frontend},
    )(inner, *operands, **dict(attrs))
    if config.use_shardy_partitioner.value:
        _attach_sharding_rule(results[0].owner, n, avals_in, wide_out)
    if unit:
        results = [_reshape(ctx, r, a) if a.ndim == 2 else r
                   for r, a in zip(results, avals_out)]
    return results


def is_rowwise(shape, n: int, lead_shape) -> bool:
    """Whether a buffer of ``shape`` is per token row: ``[*lead]`` or ``[*lead, X]`` with the
    ``n`` token dims ``lead_shape`` (a zero-size ``(0,)`` placeholder never is)."""
    shape = tuple(shape)
    return (n > 0 and len(shape) in (n, n + 1) and shape[:n] == tuple(lead_shape)
            and shape != (0,))


def row_sharding_rule(shapes_in, shapes_out, n: int) -> SdyShardingRule:
    """Shardy rule for a row-wise custom call: the ``n`` token dims of every per-row buffer
    (``is_rowwise``, token dims those of the first operand) share factors; every other dim is
    its own factor and is replicated."""
    lead_shape = tuple(shapes_in[0])[:n]
    lead = tuple(f"t{i}" for i in range(n))
    own: list[str] = []

    def mapping(shape):
        dims = list(lead) if is_rowwise(shape, n, lead_shape) else []
        for _ in range(len(shape) - len(dims)):
            own.append(f"x{len(own)}")
            dims.append(own[-1])
        return ArrayMapping(*dims)

    return SdyShardingRule(tuple(mapping(s) for s in shapes_in),
                           tuple(mapping(s) for s in shapes_out),
                           need_replication_factors=tuple(own))


def _attach_sharding_rule(op, n: int, avals_in, avals_out) -> None:
    """Shardy rule matching the batch partitioner: every ``[*lead, X]`` buffer row-wise, the
    rank-1 ones replicated (the lowering has checked that these are the only two kinds)."""
    rule = row_sharding_rule([a.shape for a in avals_in], [a.shape for a in avals_out], n)
    op.attributes["sdy.sharding_rule"] = sdy_sharding_rule_to_mlir(
        rule, [o.type for o in op.operands], [r.type for r in op.results])


def _widen(aval):
    """[T, X] -> [T, 1, X], sharding included."""
    s = getattr(aval, "sharding", None)
    shape = (aval.shape[0], 1, aval.shape[1])
    if s is None:
        return aval.update(shape=shape)
    spec = tuple(s.spec) + (None,) * (aval.ndim - len(s.spec))
    return aval.update(shape=shape,
                       sharding=s.update(spec=jax.sharding.PartitionSpec(spec[0], None, spec[1])))


def _abstract_eval(*avals, target_name, out_types, aliases, attrs, bias_operand):
    del avals, target_name, aliases, attrs, bias_operand
    return out_types


def _prepend(aval, size: int, axis_spec):
    """``aval`` with a new leading dim of ``size``, sharded as ``axis_spec``."""
    s = getattr(aval, "sharding", None)
    if s is None:
        return aval.update(shape=(size,) + aval.shape)
    spec = tuple(s.spec) + (None,) * (aval.ndim - len(s.spec))
    return aval.update(shape=(size,) + aval.shape,
                       sharding=s.update(spec=jax.sharding.PartitionSpec(axis_spec, *spec)))


def _batching(prim, axis_data, args, dims, *, target_name, out_types, aliases, attrs,
              bias_operand):
    """vmap: the batch dim becomes one more leading token dim of every buffer (one call)."""
    size = axis_data.size
    mesh_axis = axis_data.explicit_mesh_axis
    new_args = []
    for i, (a, d) in enumerate(zip(args, dims)):
        if i == bias_operand or (a.ndim == 1 and a.shape[0] == 0 and d is None):
            new_args.append(a)  # the bias: below; an empty placeholder stays empty
        else:
            new_args.append(batching.bdim_at_front(a, d, size, mesh_axis))
    first = jax.typeof(new_args[0])
    lead = first.shape[:-1]
    first_spec = tuple(getattr(first.sharding, "spec", ()))
    axis_spec = first_spec[0] if first_spec else None
    if bias_operand is not None and dims[bias_operand] is not None:
        # one bias row per token: [B, E] -> [B, 1.., E] -> [*lead, E]
        b = jax.numpy.moveaxis(args[bias_operand], dims[bias_operand], 0)
        b = b.reshape(b.shape[:1] + (1,) * (len(lead) - 1) + b.shape[1:])
        new_args[bias_operand] = jax.numpy.broadcast_to(b, lead + b.shape[-1:])
    empty = [t.ndim == 1 and t.shape[0] == 0 for t in out_types]
    new_out = tuple(t if e else _prepend(t, size, axis_spec) for t, e in zip(out_types, empty))
    outs = prim.bind(*new_args, target_name=target_name, out_types=new_out, aliases=aliases,
                     attrs=attrs, bias_operand=bias_operand)
    return outs, [None if e else 0 for e in empty]


def _make_primitive(target: str, abstract_eval=None, lowering=None,
                    batched: bool = True) -> Primitive:
    """A primitive for an FFI target: by default the batch-partitioned custom call with its
    vmap rule; ``_make_plain_primitive`` passes the plain forms."""
    p = Primitive(target)
    p.multiple_results = True
    p.def_impl(functools.partial(dispatch.apply_primitive, p))
    p.def_abstract_eval(abstract_eval or _abstract_eval)
    mlir.register_lowering(p, functools.partial(lowering or _lowering, target))
    if batched:
        batching.fancy_primitive_batchers[p] = functools.partial(_batching, p)
    return p


def _plain_lowering(target: str, ctx, *operands, out_types, aliases, attrs):
    """The custom call as it is, for targets partitioned outside XLA's batch partitioner."""
    del out_types
    return jax.ffi.ffi_lowering(target, operand_output_aliases=dict(aliases))(
        ctx, *operands, **dict(attrs))


def _plain_abstract_eval(*avals, out_types, aliases, attrs):
    del avals, aliases, attrs
    return out_types


def _make_plain_primitive(target: str) -> Primitive:
    return _make_primitive(target, _plain_abstract_eval, _plain_lowering, batched=False)


fwd_p = _make_primitive(_ffi.FWD_TARGET)
bwd_p = _make_primitive(_ffi.BWD_TARGET)
aux_fwd_p = _make_primitive(_ffi.AUX_SCORES_FWD_TARGET)
aux_bwd_p = _make_primitive(_ffi.AUX_SCORES_BWD_TARGET)


def _hashable_attrs(attrs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(attrs.items()))


def ffi_forward(out_types, logits, bias, alias, attrs: dict[str, Any]):
    """``jax_router_fwd(logits, bias[, alias])`` partitioned row-wise; returns its 5 outputs."""
    args = (logits, bias) + ((alias,) if alias is not None else ())
    return tuple(fwd_p.bind(
        *args, target_name=_ffi.FWD_TARGET, out_types=tuple(out_types),
        aliases=((2, 3),) if alias is not None else (), attrs=_hashable_attrs(attrs),
        bias_operand=1))


# Quantile balancing's forward returns a histogram summed over all rows, which XLA's batch
# partitioner cannot produce (it would leave each device's partial counts); qb.py partitions
# it with custom_partitioning instead, so its primitive lowers to the plain custom call.
qb_fwd_p = _make_plain_primitive(_ffi.QB_FWD_TARGET)


def ffi_qb_forward(out_types, logits, bias, bin_bounds, histogram, alias, attrs: dict[str, Any]):
    """``jax_router_qb_fwd(logits, bias, bin_bounds, histogram[, alias])``; its 7 outputs. The
    histogram operand is aliased to the last output, which the kernel accumulates into."""
    args = (logits, bias, bin_bounds, histogram) + ((alias,) if alias is not None else ())
    aliases = ((3, 6),) + (((4, 3),) if alias is not None else ())
    return tuple(qb_fwd_p.bind(*args, out_types=tuple(out_types), aliases=aliases,
                               attrs=_hashable_attrs(attrs)))


def ffi_backward(out_type, g, idx, act, logits, attrs: dict[str, Any]):
    """``jax_router_bwd(g, idx, act, logits | [0])`` partitioned row-wise; returns grad_logits."""
    (out,) = bwd_p.bind(g, idx, act, logits, target_name=_ffi.BWD_TARGET,
                        out_types=(out_type,), aliases=(), attrs=_hashable_attrs(attrs),
                        bias_operand=None)
    return out


def ffi_aux_scores_forward(out_types, logits, attrs: dict[str, Any]):
    """``jax_router_aux_scores_fwd(logits)`` partitioned row-wise; returns (scores, map)."""
    return tuple(aux_fwd_p.bind(logits, target_name=_ffi.AUX_SCORES_FWD_TARGET,
                                out_types=tuple(out_types), aliases=(),
                                attrs=_hashable_attrs(attrs), bias_operand=None))


def ffi_aux_scores_backward(out_type, g, logits, attrs: dict[str, Any]):
    """``jax_router_aux_scores_bwd(g, logits)`` partitioned row-wise; returns grad_logits."""
    (out,) = aux_bwd_p.bind(g, logits, target_name=_ffi.AUX_SCORES_BWD_TARGET,
                            out_types=(out_type,), aliases=(), attrs=_hashable_attrs(attrs),
                            bias_operand=None)
    return out


def whole_last_dim(x):
    """``x`` with its last (expert / k) dim unsharded: an explicitly sharded last dim is gathered
    here, outside the ``custom_vjp``, so that the gradient is resharded back by ``reshard``'s
    transpose. (Under Auto axes the partitioner gathers it at the custom call instead.)"""
    if x is None or x.ndim == 0:
        return x
    t = jax.typeof(x)
    s = getattr(t, "sharding", None)
    spec = tuple(getattr(s, "spec", ()))
    if len(spec) < x.ndim or spec[x.ndim - 1] is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec[:-1], None))
