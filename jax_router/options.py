"""Static routing options: argument validation (docs/semantics.md#validation) and the FFI attributes.

Every public function turns its keyword arguments into one frozen, hashable ``RouteOptions``
here, before anything is traced or launched, so that each rule is checked in one place and
each error names the argument it is about.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike


class ScoreFunction(enum.IntEnum):
    """The router's score functions (``score_function=`` of every public function).

    Members: ``SOFTMAX`` (``softmax(x)`` with ``use_pre_softmax``, else the raw logits, then a
    softmax over the selected ones), ``SIGMOID`` (``1 / (1 + exp(-x))``) and ``SQRTSOFTPLUS``
    (``sqrt(log1p(exp(x)))``). Wherever a score function is taken, the strings "softmax",
    "sigmoid", "sqrtsoftplus" (any case) and members of any other enum with those names
    (TransformerEngine's, for one) work too; they are matched by name, never by integer value,
    because the integer values are those of the C++ ``ScoreFn`` (ffi/routing_math.h) and differ from
    TransformerEngine's.
    """

    SOFTMAX = 0
    SIGMOID = 1
    SQRTSOFTPLUS = 2


class OutputMode(enum.IntEnum):
    """Which outputs one forward call writes; the value is the C++ ``OutputMode``
    (ffi/routing_math.h), which a test compares with this list."""

    COMPACT = 0  # route_topk: weights f32 [*lead, k] + indices [*lead, k]
    MAP = 1  # probs [*lead, E] + routing map
    DENSE = 2  # probs [*lead, E] + indices [*lead, k]


class RoutingMapFormat(enum.Enum):
    """Layout of the routing map (``routing_map_format=``).

    ``BYTEMAP``: ``bool[*lead, E]``, True at the selected experts. ``BITMAP_U8``:
    ``uint8[*lead, ceil(E/8)]``, bit ``e % 8`` of byte ``e // 8`` set for selected expert ``e``
    (LSB first), padding bits 0. Also accepted: the strings "bytemap" / "bitmap_u8" (any case),
    any enum member with one of those names, and TransformerEngine's integers 0 / 1.
    """

    BYTEMAP = "bytemap"
    BITMAP_U8 = "bitmap_u8"


# The C++ MapFormat value of each layout (ffi/routing_math.h; a test compares them).
_FFI_MAP_FORMAT = {RoutingMapFormat.BYTEMAP: 0, RoutingMapFormat.BITMAP_U8: 1}


def map_format_attr(fmt: RoutingMapFormat) -> np.int32:
    """The FFI attribute of a map layout (int32, as the C++ enum)."""
    return np.int32(_FFI_MAP_FORMAT[fmt])


def score_function_attr(fn: ScoreFunction) -> np.int32:
    """The FFI attribute of a score function (int32, as the C++ enum)."""
    return np.int32(int(fn))


# What the public functions accept for these two options (see the enums above).
ScoreFunctionLike = Union[str, enum.Enum]
RoutingMapFormatLike = Union[str, enum.Enum, int]


_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_INDEX_DTYPES = (jnp.int16, jnp.int32, jnp.int64)


def _enum_name(value: Any) -> str:
    """Lower-case name of a string or an enum-like value (ours, TE's, or any other enum)."""
    if isinstance(value, str):
        return value.lower()
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name.lower()
    return str(value).lower()


def score_function_of(value: Any) -> ScoreFunction:
    """``ScoreFunction`` of a string or an enum member with a score function's name.

    Raises:
      ValueError: any other value, bare integers included.
    """
    if isinstance(value, ScoreFunction):
        return value
    name = _enum_name(value)
    for f in ScoreFunction:
        if f.name.lower() == name:
            return f
    names = ", ".join(repr(f.name.lower()) for f in ScoreFunction)
    raise ValueError(f"score_function must be one of {names}, got {value!r}")


# TransformerEngine also accepts its enum's integer values for the map format (its score
# functions take no integers, and their values differ from ours, so those stay names only).
_TE_FORMAT_INTS = {0: RoutingMapFormat.BYTEMAP, 1: RoutingMapFormat.BITMAP_U8}


def routing_map_format_of(value: Any) -> RoutingMapFormat:
    """``RoutingMapFormat`` of a string, an enum member with that name, or TE's ints 0 / 1.

    Raises:
      ValueError: anything else (False, 8, "bitmap", ...).
    """
    if isinstance(value, RoutingMapFormat):
        return value
    plain_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, enum.Enum))
    if plain_int and int(value) in _TE_FORMAT_INTS:
        return _TE_FORMAT_INTS[int(value)]
    name = _enum_name(value)
    for f in RoutingMapFormat:
        if f.value == name or f.name.lower() == name:
            return f
    hint = ""
    if isinstance(value, (bool, np.bool_)):
        hint = (" (TransformerEngine's newer signature has compute_aux_scores in this position; "
                "here pass it by keyword: compute_aux_scores=...)")
    raise ValueError(
        "routing_map_format must be 'bytemap' or 'bitmap_u8' (or TransformerEngine's 0 / 1), "
        f"got {value!r}{hint}"
    )


def as_array(value: Any) -> Any:
    """``value`` as a JAX array by ``jnp.asarray``'s rules.

    The public functions take what ``jax.numpy`` functions take: numpy arrays, Python lists and
    scalars too, with float64 / int64 becoming float32 / int32 unless ``jax_enable_x64`` is on.
    That is also what ``jax.jit`` does to such arguments, so an eager call and a jitted one see
    the same dtype (and pass or fail the dtype rules alike). JAX arrays, tracers and None pass
    as they are, and so does anything ``jnp.asarray`` refuses (a string, a ragged list): the
    argument's own dtype rule then reports it, by name.
    """
    if value is None or isinstance(value, jax.Array):
        return value
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):
        return value


def _traced(value: Any, argname: str, kind: str) -> None:
    """Static options are compiled into the custom call: a traced value cannot be one."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{argname} must be a static Python {kind}, not a traced value ({jax.typeof(value)}): "
            "it is fixed when the function is compiled. Under jax.jit pass it through "
            "static_argnums / static_argnames (or close over it) instead of as an array argument"
        )


def static_bool(value: Any, argname: str) -> bool:
    """A flag: Python or numpy bool only (no strings, ints or arrays, which ``bool()`` would
    quietly accept: ``bool("no")`` is True)."""
    _traced(value, argname, "bool")
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{argname} must be a bool (True or False), got {value!r}")


def static_int(value: Any, argname: str) -> int:
    """A static integer option: Python or numpy int (not bool, not an array or tracer)."""
    _traced(value, argname, "int")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argname} must be an int, got {value!r}")
    return int(value)


def static_float(value: Any, argname: str) -> float:
    """A static real number: Python or numpy int / float (not bool, a string, an array or a
    tracer); returned as a Python float."""
    _traced(value, argname, "float")
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{argname} must be a number (int or float), got {value!r}")
    return float(value)


def check_logits(logits: Any) -> None:
    """Raises TypeError unless ``logits`` is float32 / bfloat16 / float16, ValueError if rank 0."""
    dtype = getattr(logits, "dtype", None)
    if dtype is None:
        raise TypeError("logits must be an array of float32, bfloat16 or float16, got "
                        f"{type(logits).__name__}")
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got dtype {dtype}")
    if jnp.ndim(logits) == 0:
        raise ValueError("logits must have at least one dimension [*lead, E], got a scalar")


def index_dtype_of(dtype: Any, num_experts: int, argname: str) -> np.dtype:
    """Validates an index dtype for ``num_experts`` experts; returns it as ``np.dtype``.

    Raises:
      TypeError: not int16 / int32 / int64 (``argname`` names the argument in the message).
      ValueError: int16 with ``num_experts > 32767``; int64 while ``jax_enable_x64`` is off.
    """
    try:
        d = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{argname} must be int16, int32 or int64, got {dtype!r}") from e
    if d not in [jnp.dtype(t) for t in _INDEX_DTYPES]:
        raise TypeError(f"{argname} must be int16, int32 or int64, got {d}")
    if d == jnp.int16 and num_experts > 32767:
        raise ValueError(f"{argname}=int16 cannot hold expert ids of E={num_experts} > 32767")
    if d == jnp.int64 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{argname}=int64 needs 64-bit types, which are off: enable them with "
            "jax.config.update('jax_enable_x64', True) (or JAX_ENABLE_X64=1)"
        )
    return d


def _off(value: Any) -> bool:
    return value is None or (isinstance(value, (int, np.integer)) and int(value) == -1)


@dataclasses.dataclass(frozen=True)
class RouteOptions:
    """The static options of one routing call (all hashable), as ``make_options`` validated them.

    ``num_groups`` / ``group_topk`` are 0 when group-limited routing is off; ``scaling_factor``
    is 1.0 when None was given; ``has_bias`` says whether an ``expert_bias`` array was passed.
    """

    num_experts: int
    topk: int
    score_function: ScoreFunction = ScoreFunction.SOFTMAX
    use_pre_softmax: bool = False
    num_groups: int = 0  # 0: group-limited routing off
    group_topk: int = 0
    scaling_factor: float = 1.0
    has_bias: bool = False

    @property
    def pre_softmax(self) -> bool:
        """Softmax over all E before selection (the one mode whose backward needs the logits)."""
        return self.score_function == ScoreFunction.SOFTMAX and self.use_pre_softmax

    def ffi_attrs(self, mode: OutputMode, map_format: RoutingMapFormat,
                  num_bins: int = 0) -> dict[str, Any]:
        """Attributes of the router's FFI targets, typed exactly as ``RouteAttrs``
        (ffi/ffi_contract.h): the handlers decode them once into typed options and reject
        any value they do not know. ``num_bins`` > 0 only for quantile balancing."""
        return dict(
            topk=np.int64(self.topk),
            score_function=score_function_attr(self.score_function),
            use_pre_softmax=bool(self.use_pre_softmax),
            num_groups=np.int64(self.num_groups),
            group_topk=np.int64(self.group_topk),
            scaling_factor=np.float32(self.scaling_factor),
            output_mode=np.int32(int(mode)),
            map_format=map_format_attr(map_format),
            num_bins=np.int64(num_bins),
        )


def make_options(
    logits: Any,
    topk: Any,
    use_pre_softmax: Any = False,
    num_groups: Any = None,
    group_topk: Any = None,
    scaling_factor: Any = None,
    score_function: Any = "softmax",
    expert_bias: Any = None,
) -> RouteOptions:
    """Checks every docs/semantics.md#validation rule that concerns the routing itself; returns ``RouteOptions``.

    Arguments are those of ``fused_topk_with_score_function`` (same order); only the shapes and
    dtypes of ``logits`` and ``expert_bias`` are read, so tracers are fine.

    Raises:
      TypeError: logits or expert_bias of a non-float dtype; a non-int ``topk``,
        ``num_groups`` or ``group_topk``; a ``scaling_factor`` that is not a number (strings
        included); a ``use_pre_softmax`` that is not a bool; any of these options traced.
      ValueError: rank-0 logits; ``topk`` outside ``[1, E]``; an unknown score function;
        ``use_pre_softmax`` with sigmoid / sqrtsoftplus; ``expert_bias`` with softmax or of a
        shape other than ``[E]``; only one of ``num_groups`` / ``group_topk`` given; the group
        rules (``num_groups > 0``, ``E % num_groups == 0``, ``group_topk <= num_groups``,
        ``topk % group_topk == 0``, ``topk / group_topk <= E / num_groups``); a non-finite
        ``scaling_factor``.
    """
    # Traced options first: otherwise a traced num_groups would read as "given without
    # group_topk" below.
    for value, argname, kind in ((topk, "topk", "int"), (num_groups, "num_groups", "int"),
                                 (group_topk, "group_topk", "int"),
                                 (scaling_factor, "scaling_factor", "float"),
                                 (use_pre_softmax, "use_pre_softmax", "bool")):
        _traced(value, argname, kind)
    check_logits(logits)
    num_experts = int(jnp.shape(logits)[-1])
    topk = static_int(topk, "topk")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk must lie in [1, E={num_experts}], got {topk}")
    fn = score_function_of(score_function)
    use_pre_softmax = static_bool(use_pre_softmax, "use_pre_softmax")
    if use_pre_softmax and fn != ScoreFunction.SOFTMAX:
        raise ValueError(
            f"use_pre_softmax=True applies to score_function='softmax' only, got {fn.name.lower()}"
        )

    if expert_bias is not None:
        if fn == ScoreFunction.SOFTMAX:
            raise ValueError(
                "expert_bias is only supported with score_function='sigmoid' or 'sqrtsoftplus'"
            )
        bdtype = getattr(expert_bias, "dtype", None)
        if bdtype is None or jnp.dtype(bdtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
            raise TypeError(f"expert_bias must be float32, bfloat16 or float16, got {bdtype}")
        if tuple(jnp.shape(expert_bias)) != (num_experts,):
            raise ValueError(
                f"expert_bias must have shape [E]=({num_experts},), got {tuple(jnp.shape(expert_bias))}"
            )

    groups_off, gtopk_off = _off(num_groups), _off(group_topk)
    if groups_off != gtopk_off:
        raise ValueError(
            "num_groups and group_topk must be given together (or both None / -1), got "
            f"num_groups={num_groups!r}, group_topk={group_topk!r}"
        )
    ng = gk = 0
    if not groups_off:
        ng, gk = static_int(num_groups, "num_groups"), static_int(group_topk, "group_topk")
        if ng <= 0:
            raise ValueError(f"num_groups must be positive, got {ng}")
        if gk <= 0:
            raise ValueError(f"group_topk must be positive, got {gk}")
        if num_experts % ng:
            raise ValueError(f"num_groups={ng} must divide the number of experts E={num_experts}")
        if gk > ng:
            raise ValueError(f"group_topk={gk} must not exceed num_groups={ng}")
        if topk % gk:
            raise ValueError(f"topk={topk} must be a multiple of group_topk={gk}")
        if topk // gk > num_experts // ng:
            raise ValueError(
                f"topk / group_topk = {topk // gk} must not exceed the group size "
                f"E / num_groups = {num_experts // ng}"
            )

    if scaling_factor is None:
        scale = 1.0
    else:
        scale = static_float(scaling_factor, "scaling_factor")
        if not math.isfinite(scale):
            raise ValueError(f"scaling_factor must be finite, got {scaling_factor!r}")

    return RouteOptions(
        num_experts=num_experts,
        topk=topk,
        score_function=fn,
        use_pre_softmax=use_pre_softmax,
        num_groups=ng,
        group_topk=gk,
        scaling_factor=scale,
        has_bias=expert_bias is not None,
    )


def dense_index_dtype(
    opts: RouteOptions,
    logits: jax.Array,
    fmt: RoutingMapFormat,
    topk_indices: jax.Array | None,
    topk_indices_dtype: DTypeLike | None,
) -> np.dtype | None:
    """Validates the dense-index request; returns its dtype, or None for routing-map output.

    Raises:
      ValueError: dense indices with "bitmap_u8"; a ``topk_indices`` buffer not of shape
        ``[*lead, topk]``; ``topk_indices_dtype`` disagreeing with the buffer's dtype; the
        int16 / int64 rules of ``options.index_dtype_of``.
      TypeError: an index dtype other than int16 / int32 / int64.
    """
    if topk_indices is None and topk_indices_dtype is None:
        return None
    if fmt == RoutingMapFormat.BITMAP_U8:
        raise ValueError(
            "dense indices (topk_indices / topk_indices_dtype) cannot be combined with "
            "routing_map_format='bitmap_u8'"
        )
    if topk_indices is not None:
        d = index_dtype_of(getattr(topk_indices, "dtype", None), opts.num_experts, "topk_indices")
        want = tuple(jnp.shape(logits)[:-1]) + (opts.topk,)
        if tuple(jnp.shape(topk_indices)) != want:
            raise ValueError(
                f"topk_indices must have shape [*lead, topk]={want}, got {tuple(jnp.shape(topk_indices))}"
            )
        if topk_indices_dtype is not None and jnp.dtype(topk_indices_dtype) != d:
            raise ValueError(
                f"topk_indices_dtype={jnp.dtype(topk_indices_dtype)} disagrees with the "
                f"topk_indices buffer's dtype {d}"
            )
        return d
    return index_dtype_of(topk_indices_dtype, opts.num_experts, "topk_indices_dtype")


def aux_scores_options(
    logits: jax.Array,
    topk: int,
    score_function: ScoreFunctionLike,
    routing_map_format: RoutingMapFormatLike,
) -> tuple[RouteOptions, RoutingMapFormat]:
    """Validates ``fused_compute_score_for_moe_aux_loss``'s arguments (docs/semantics.md#validation).

    Raises:
      TypeError / ValueError: bad logits dtype or rank, ``topk`` not an int in ``[1, E]``, an
      unknown score function or routing map format.
    """
    opts = make_options(logits, topk, score_function=score_function)
    return opts, routing_map_format_of(routing_map_format)


# ---- quantile balancing (docs/semantics.md#qb) ------------------------------------------------

MAX_QB_BINS = 1 << 24  # routing_math.h kMaxQbBins: float32(num_bins) and every bin edge exact


def qb_options(logits: Any, topk: Any, expert_bias: Any, bin_bounds: Any, num_bins: Any,
               histogram: Any, scaling_factor: Any, score_function: Any, use_pre_softmax: Any,
               num_groups: Any, group_topk: Any) -> tuple[RouteOptions, int]:
    """Validates the quantile-balancing functions' arguments; returns ``(RouteOptions, num_bins)``.

    Raises (TypeError / ValueError naming the argument): every ``make_options`` rule; a score
    function other than sigmoid; ``use_pre_softmax`` or group-limited routing; ``topk + 1 > E``;
    ``num_bins`` not a static int in ``[1, 2^24]``; ``bin_bounds`` not a float ``[2]`` array;
    concrete ``bin_bounds`` not finite with ``lower < upper``; a ``histogram`` not int32
    ``[E, num_bins]``.
    """
    opts = make_options(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor,
                        score_function, expert_bias)
    if opts.score_function != ScoreFunction.SIGMOID:
        raise ValueError("quantile balancing needs score_function='sigmoid', got "
                         f"{opts.score_function.name.lower()}")
    if opts.group_topk > 0:
        raise ValueError("quantile balancing does not take num_groups / group_topk (group-"
                         "limited routing)")
    E = opts.num_experts
    if opts.topk + 1 > E:
        raise ValueError(f"quantile balancing needs topk + 1 <= E (the cutoff is the "
                         f"(topk + 1)-th score), got topk={opts.topk}, E={E}")
    nb = static_int(num_bins, "num_bins")
    if not 1 <= nb <= MAX_QB_BINS:
        raise ValueError(f"num_bins must lie in [1, 2^24], got {nb}")
    bdtype = getattr(bin_bounds, "dtype", None)
    if bdtype is None or jnp.dtype(bdtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise TypeError(f"bin_bounds must be a float32 (or bfloat16 / float16) array [lower, "
                        f"upper], got {bdtype if bdtype is not None else type(bin_bounds).__name__}")
    if tuple(jnp.shape(bin_bounds)) != (2,):
        raise ValueError(f"bin_bounds must have shape (2,) = [lower, upper], got "
                         f"{tuple(jnp.shape(bin_bounds))}")
    if not isinstance(bin_bounds, jax.core.Tracer):
        lo, hi = (float(v) for v in np.asarray(bin_bounds, np.float32))
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bin_bounds must be finite with lower < upper, got [{lo}, {hi}]")
    if histogram is not None:
        hdtype = getattr(histogram, "dtype", None)
        if hdtype is None or jnp.dtype(hdtype) != jnp.int32:
            raise TypeError(f"histogram must be an int32 array [E, num_bins], got "
                            f"{hdtype if hdtype is not None else type(histogram).__name__}")
        if tuple(jnp.shape(histogram)) != (E, nb):
            raise ValueError(f"histogram must have shape [E, num_bins] = ({E}, {nb}), got "
                             f"{tuple(jnp.shape(histogram))}")
    return opts, nb


def qb_inputs(logits: Any, topk: Any, expert_bias: Any, bin_bounds: Any, num_bins: Any,
              histogram: Any, scaling_factor: Any, score_function: Any, use_pre_softmax: Any,
              num_groups: Any, group_topk: Any):
    """The quantile-balancing functions' arrays (``as_array``) and options (``qb_options``):
    ``(opts, num_bins, logits, expert_bias, bin_bounds, histogram)``."""
    logits, expert_bias = as_array(logits), as_array(expert_bias)
    bin_bounds, histogram = as_array(bin_bounds), as_array(histogram)
    opts, nb = qb_options(logits, topk, expert_bias, bin_bounds, num_bins, histogram,
                          scaling_factor, score_function, use_pre_softmax, num_groups,
                          group_topk)
    return opts, nb, logits, expert_bias, bin_bounds, histogram
