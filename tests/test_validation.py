"""docs/semantics.md#validation: every invalid argument raises TypeError / ValueError naming the argument, at trace
time, before anything is launched; the public functions and the pure-JAX reference validate
identically (same exception type, same message)."""

from __future__ import annotations

import enum
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_router as jr
from jax_router import reference

from .util import random_bias, random_logits

E = 8
T = 3
X = random_logits(0, (T, E))
BIAS = random_bias(0, E)

FUSED = {
    "fused": jr.fused_topk_with_score_function,
    "ref_fused": reference.fused_topk_with_score_function,
}
COMPACT = {"route_topk": jr.route_topk, "ref_route_topk": reference.route_topk}
ALL = {**FUSED, **COMPACT}
# Each function's counterpart on the other side (public <-> reference).
TWIN = {
    jr.fused_topk_with_score_function: reference.fused_topk_with_score_function,
    reference.fused_topk_with_score_function: jr.fused_topk_with_score_function,
    jr.route_topk: reference.route_topk,
    reference.route_topk: jr.route_topk,
}


def over(table):
    return pytest.mark.parametrize("fn", list(table.values()), ids=list(table.keys()))


def is_fused(fn):
    return fn in (jr.fused_topk_with_score_function, reference.fused_topk_with_score_function)


@pytest.fixture
def ffi_calls(monkeypatch):
    """Records every FFI custom call made while the test runs (nothing may be launched): any
    jax.ffi.ffi_call, and the router's own calls (jax_router/custom_calls.py binds them)."""
    from jax_router import _ffi, custom_calls

    calls = []
    real = jax.ffi.ffi_call

    def spy(target, *a, **kw):
        calls.append(target)
        return real(target, *a, **kw)

    def spy_entry(name, target):
        real_entry = getattr(custom_calls, name)

        def entry(*a, **kw):
            calls.append(target)
            return real_entry(*a, **kw)

        monkeypatch.setattr(custom_calls, name, entry)

    monkeypatch.setattr(jax.ffi, "ffi_call", spy)
    spy_entry("ffi_forward", _ffi.FWD_TARGET)
    spy_entry("ffi_backward", _ffi.BWD_TARGET)
    return calls


def expect(fn, exc, match, logits, topk, **kw):
    """fn(logits, topk, **kw) raises exc matching `match`; its twin raises the identical error."""
    with pytest.raises(exc, match=match) as info:
        fn(logits, topk, **kw)
    assert type(info.value) is exc, f"{type(info.value).__name__} is not exactly {exc.__name__}"
    with pytest.raises(exc) as twin_info:
        TWIN[fn](logits, topk, **kw)
    assert type(twin_info.value) is type(info.value)
    assert str(twin_info.value) == str(info.value), "reference and public messages differ"
    return info.value


# ---- logits ------------------------------------------------------------------------------


@over(ALL)
@pytest.mark.parametrize(
    "bad",
    [
        jnp.zeros((T, E), jnp.int32),
        jnp.zeros((T, E), jnp.bool_),
        np.zeros((T, E), np.int8),
    ],
    # (numpy float64 is float32 by jnp.asarray's rules for the public functions, as under jit:
    # tests/test_inputs.py)
    ids=["int32", "bool", "np_int8"],
)
def test_logits_dtype(fn, bad, ffi_calls):
    expect(fn, TypeError, "logits", bad, 2)
    assert ffi_calls == []


@over(ALL)
def test_logits_without_dtype(fn):
    # (a list of floats is an array by jnp.asarray's rules: tests/test_inputs.py)
    expect(fn, TypeError, "logits", "not an array", 2)


@over(ALL)
def test_logits_float64_with_x64(fn):
    with jax.enable_x64(True):
        expect(fn, TypeError, "logits", jnp.zeros((T, E), jnp.float64), 2)


@over(ALL)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_logits_rank0(fn, dtype, ffi_calls):
    expect(fn, ValueError, "logits", jnp.asarray(1.5, dtype), 1)
    assert ffi_calls == []


# ---- topk --------------------------------------------------------------------------------


@over(ALL)
@pytest.mark.parametrize("topk", [0, -1, E + 1, 10 * E])
def test_topk_out_of_range(fn, topk, ffi_calls):
    expect(fn, ValueError, r"topk", X, topk)
    assert ffi_calls == []


@over(ALL)
@pytest.mark.parametrize("topk", [2.0, "2", True, None, jnp.int32(2)], ids=repr)
def test_topk_not_int(fn, topk):
    # topk is static: floats, strings, bools and JAX scalars are all rejected.
    expect(fn, TypeError, r"topk", X, topk)


@over(ALL)
def test_topk_numpy_int_accepted(fn):
    out = fn(X, np.int64(2))
    assert out[1].shape[:-1] == (T,)


# ---- score function ----------------------------------------------------------------------


@over(ALL)
@pytest.mark.parametrize("name", ["relu", "", "soft_max", None, 3], ids=repr)
def test_unknown_score_function(fn, name, ffi_calls):
    expect(fn, ValueError, "score_function", X, 2, score_function=name)
    assert ffi_calls == []


@over(ALL)
@pytest.mark.parametrize("name", ["sigmoid", "sqrtsoftplus"])
def test_pre_softmax_with_non_softmax(fn, name):
    expect(fn, ValueError, "use_pre_softmax", X, 2, score_function=name, use_pre_softmax=True)


# ---- expert_bias -------------------------------------------------------------------------


@over(ALL)
@pytest.mark.parametrize("pre", [False, True])
def test_bias_with_softmax(fn, pre):
    expect(fn, ValueError, "expert_bias", X, 2, score_function="softmax", use_pre_softmax=pre,
           expert_bias=BIAS)


@over(ALL)
@pytest.mark.parametrize("shape", [(E + 1,), (E - 1,), (1, E), (T, E), ()], ids=str)
@pytest.mark.parametrize("name", ["sigmoid", "sqrtsoftplus"])
def test_bias_wrong_shape(fn, shape, name):
    expect(fn, ValueError, "expert_bias", X, 2, score_function=name,
           expert_bias=jnp.zeros(shape, jnp.float32))


@over(ALL)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_bias_wrong_dtype(fn, dtype):
    expect(fn, TypeError, "expert_bias", X, 2, score_function="sigmoid",
           expert_bias=jnp.zeros((E,), dtype))


# ---- groups ------------------------------------------------------------------------------


@over(ALL)
@pytest.mark.parametrize("ng,gk", [(4, None), (None, 2), (4, -1), (-1, 2)], ids=str)
def test_groups_only_one_set(fn, ng, gk):
    err = expect(fn, ValueError, "num_groups", X, 2, num_groups=ng, group_topk=gk)
    assert "group_topk" in str(err)


@over(ALL)
@pytest.mark.parametrize("ng", [0, -2])
def test_num_groups_not_positive(fn, ng):
    expect(fn, ValueError, "num_groups", X, 2, num_groups=ng, group_topk=1)


@over(ALL)
@pytest.mark.parametrize("gk", [0, -3])
def test_group_topk_not_positive(fn, gk):
    expect(fn, ValueError, "group_topk", X, 2, num_groups=2, group_topk=gk)


@over(ALL)
@pytest.mark.parametrize("ng", [3, 5, 16])
def test_num_groups_does_not_divide_e(fn, ng):
    err = expect(fn, ValueError, "num_groups", X, 1, num_groups=ng, group_topk=1)
    assert str(E) in str(err)


@over(ALL)
def test_group_topk_exceeds_num_groups(fn):
    expect(fn, ValueError, "group_topk", X, 4, num_groups=2, group_topk=4)


@over(ALL)
def test_topk_not_multiple_of_group_topk(fn):
    err = expect(fn, ValueError, "group_topk", X, 3, num_groups=4, group_topk=2)
    assert "topk" in str(err)


@over(ALL)
def test_per_group_topk_exceeds_group_size(fn):
    # 4 groups of 2 experts; topk / group_topk = 4 > 2
    err = expect(fn, ValueError, "group_topk", X, 4, num_groups=4, group_topk=1)
    assert "num_groups" in str(err)


@over(ALL)
@pytest.mark.parametrize("ng,gk", [(2.0, 1), (2, 1.0), ("2", 1)], ids=str)
def test_groups_not_int(fn, ng, gk):
    err = expect(fn, TypeError, "num_groups|group_topk", X, 2, num_groups=ng, group_topk=gk)
    assert ("num_groups" if not isinstance(ng, int) else "group_topk") in str(err)


@over(ALL)
@pytest.mark.parametrize("ng,gk", [(-1, -1), (None, -1), (-1, None), (np.int64(-1), -1)],
                         ids=str)
def test_minus_one_means_groups_off(fn, ng, gk):
    want = fn(X, 3)
    got = fn(X, 3, num_groups=ng, group_topk=gk)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- index dtypes ------------------------------------------------------------------------


INDEX_REQUESTS = [(name, fn, how) for name, fn in ALL.items()
                  for how in (("dtype", "buffer") if name in FUSED else ("dtype",))]
over_index_requests = pytest.mark.parametrize(
    "fn,how", [(fn, how) for _, fn, how in INDEX_REQUESTS],
    ids=[f"{name}-{how}" for name, _, how in INDEX_REQUESTS])


def index_kwargs(fn, how, dtype, logits, topk):
    """Requests indices of `dtype` the way `how` says (route_topk only has index_dtype)."""
    if not is_fused(fn):
        return dict(index_dtype=dtype), "index_dtype"
    if how == "dtype":
        return dict(topk_indices_dtype=dtype), "topk_indices_dtype"
    buf = np.zeros(tuple(jnp.shape(logits)[:-1]) + (topk,), dtype)
    return dict(topk_indices=buf), "topk_indices"


@over_index_requests
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint32, np.float32, np.bool_],
                         ids=lambda d: np.dtype(d).name)
def test_bad_index_dtype(fn, how, dtype, ffi_calls):
    kw, arg = index_kwargs(fn, how, dtype, X, 2)
    err = expect(fn, TypeError, arg, X, 2, **kw)
    assert "int16" in str(err)
    assert ffi_calls == []


@over(ALL)
@pytest.mark.parametrize("dtype", ["not_a_dtype", object()], ids=["string", "object"])
def test_index_dtype_not_a_dtype(fn, dtype):
    kw, arg = index_kwargs(fn, "dtype", dtype, X, 2)
    expect(fn, TypeError, arg, X, 2, **kw)


@over_index_requests
def test_int16_with_too_many_experts(fn, how, ffi_calls):
    logits = jnp.zeros((0, 40000), jnp.float32)
    kw, arg = index_kwargs(fn, how, np.int16, logits, 1)
    err = expect(fn, ValueError, arg, logits, 1, **kw)
    assert "int16" in str(err) and "40000" in str(err)
    assert ffi_calls == []


@over_index_requests
def test_int16_at_the_limit_is_fine(fn, how):
    logits = jnp.zeros((0, 32767), jnp.float32)
    kw, _ = index_kwargs(fn, how, np.int16, logits, 1)
    out = fn(logits, 1, **kw)
    assert out[1].shape == (0, 1) and out[1].dtype == jnp.int16


@over_index_requests
def test_int64_without_x64(fn, how, ffi_calls):
    assert not jax.config.jax_enable_x64
    if how == "buffer":
        pytest.skip("the public function converts a numpy int64 buffer to int32 (jnp.asarray's "
                    "rules, as under jit); with x64 off no int64 JAX array exists")
    kw, arg = index_kwargs(fn, how, np.int64, X, 2)  # a numpy int64 buffer keeps its dtype
    err = expect(fn, ValueError, arg, X, 2, **kw)
    assert "jax_enable_x64" in str(err)
    assert ffi_calls == []


@over_index_requests
def test_int64_with_x64(fn, how):
    with jax.enable_x64(True):
        kw, _ = index_kwargs(fn, how, np.int64, X, 2)
        if how == "buffer":
            kw = dict(topk_indices=jnp.asarray(kw["topk_indices"]))
        out = fn(X, 2, **kw)
        assert out[1].dtype == jnp.int64  # never silently int32
    ref = reference.route_topk(X, 2)[1]
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(ref))


@over(FUSED)
@pytest.mark.parametrize("shape", [(T, 3), (T + 1, 2), (T * 2,), (1, T, 2), (T, 2, 1), ()],
                         ids=str)
def test_topk_indices_wrong_shape(fn, shape, ffi_calls):
    expect(fn, ValueError, "topk_indices", X, 2, topk_indices=jnp.zeros(shape, jnp.int32))
    assert ffi_calls == []


@over(FUSED)
def test_topk_indices_wrong_lead_dims(fn):
    x = random_logits(2, (2, 3, E))
    expect(fn, ValueError, "topk_indices", x, 2, topk_indices=jnp.zeros((3, 2, 2), jnp.int32))
    expect(fn, ValueError, "topk_indices", x, 2, topk_indices=jnp.zeros((6, 2), jnp.int32))


@over(FUSED)
def test_topk_indices_dtype_disagrees_with_buffer(fn):
    expect(fn, ValueError, "topk_indices_dtype", X, 2,
           topk_indices=jnp.zeros((T, 2), jnp.int32), topk_indices_dtype=jnp.int16)


@over(FUSED)
def test_topk_indices_dtype_agrees_with_buffer(fn):
    _, idx = fn(X, 2, topk_indices=jnp.zeros((T, 2), jnp.int16), topk_indices_dtype=jnp.int16)
    assert idx.dtype == jnp.int16 and idx.shape == (T, 2)


# ---- routing map format ------------------------------------------------------------------


@over(FUSED)
@pytest.mark.parametrize("how", ["dtype", "buffer"])
@pytest.mark.parametrize("fmt", ["bitmap_u8", "BITMAP_U8", jr.RoutingMapFormat.BITMAP_U8],
                         ids=repr)
def test_dense_indices_with_bitmap(fn, how, fmt, ffi_calls):
    kw, _ = index_kwargs(fn, how, np.int32, X, 2)
    err = expect(fn, ValueError, "bitmap_u8", X, 2, routing_map_format=fmt, **kw)
    assert "topk_indices" in str(err)
    assert ffi_calls == []


@over(FUSED)
@pytest.mark.parametrize("fmt", ["bitmap", "dense", "u8", "", None, 8], ids=repr)
def test_unknown_routing_map_format(fn, fmt, ffi_calls):
    expect(fn, ValueError, "routing_map_format", X, 2, routing_map_format=fmt)
    assert ffi_calls == []


@over(FUSED)
def test_routing_map_format_enums(fn):
    class Fmt(enum.Enum):
        bitmap_u8 = 7
        BYTEMAP = "whatever"

    want_bits = fn(X, 3, routing_map_format="bitmap_u8")[1]
    want_bytes = fn(X, 3, routing_map_format="bytemap")[1]
    for fmt in (jr.RoutingMapFormat.BITMAP_U8, Fmt.bitmap_u8, "BITMAP_U8"):
        np.testing.assert_array_equal(np.asarray(fn(X, 3, routing_map_format=fmt)[1]),
                                      np.asarray(want_bits))
    for fmt in (jr.RoutingMapFormat.BYTEMAP, Fmt.BYTEMAP):
        np.testing.assert_array_equal(np.asarray(fn(X, 3, routing_map_format=fmt)[1]),
                                      np.asarray(want_bytes))


# ---- scaling factor ----------------------------------------------------------------------


@over(ALL)
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), np.float32("nan"),
                                   np.inf], ids=repr)
def test_non_finite_scaling_factor(fn, scale, ffi_calls):
    expect(fn, ValueError, "scaling_factor", X, 2, scaling_factor=scale)
    assert ffi_calls == []


@over(ALL)
@pytest.mark.parametrize("scale", ["two", [1.0], object()], ids=["str", "list", "object"])
def test_non_numeric_scaling_factor(fn, scale):
    expect(fn, TypeError, "scaling_factor", X, 2, scaling_factor=scale)


# ---- implementation switch ---------------------------------------------------------------


@pytest.mark.parametrize("fn", [jr.fused_topk_with_score_function, jr.route_topk])
@pytest.mark.parametrize("impl", ["cuda", "XLA", "", "reference"])
def test_unknown_implementation(fn, impl):
    with pytest.raises(ValueError, match="implementation"):
        fn(X, 2, implementation=impl)


# ---- enums for score_function ------------------------------------------------------------


class TEStyleScore(enum.Enum):
    softmax = 0
    sigmoid = 1
    sqrtsoftplus = 2


class UpperScore(enum.Enum):
    SIGMOID = "anything"


@over(ALL)
@pytest.mark.parametrize(
    "sf",
    [jr.ScoreFunction.SIGMOID, TEStyleScore.sigmoid, UpperScore.SIGMOID, "SIGMOID", "Sigmoid"],
    ids=repr,
)
def test_score_function_enums(fn, sf):
    want = fn(X, 4, score_function="sigmoid", expert_bias=BIAS)
    got = fn(X, 4, score_function=sf, expert_bias=BIAS)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@over(ALL)
def test_score_function_enum_still_validated(fn):
    # An enum member named sigmoid is sigmoid: use_pre_softmax is then an error.
    expect(fn, ValueError, "use_pre_softmax", X, 2, score_function=TEStyleScore.sigmoid,
           use_pre_softmax=True)
    expect(fn, ValueError, "expert_bias", X, 2, score_function=TEStyleScore.softmax,
           expert_bias=BIAS)


# ---- errors come at trace time, under jit too, before anything is launched --------------

JIT_CASES = {
    "topk0": (ValueError, dict(topk=0)),
    "score_fn": (ValueError, dict(score_function="tanh")),
    "pre_softmax": (ValueError, dict(score_function="sigmoid", use_pre_softmax=True)),
    "bias_softmax": (ValueError, dict(expert_bias=BIAS)),
    "groups": (ValueError, dict(num_groups=3, group_topk=1)),
    "scale": (ValueError, dict(scaling_factor=float("nan"))),
}


@over(ALL)
@pytest.mark.parametrize("case", list(JIT_CASES), ids=list(JIT_CASES))
def test_raises_under_jit_before_launch(fn, case, ffi_calls):
    exc, kw = JIT_CASES[case]
    kw = dict(kw)
    topk = kw.pop("topk", 2)
    with pytest.raises(exc) as eager:
        fn(X, topk, **kw)
    with pytest.raises(exc) as jitted:
        jax.jit(lambda x: fn(x, topk, **kw))(X)
    assert str(jitted.value) == str(eager.value)
    with pytest.raises(exc) as traced:
        jax.make_jaxpr(lambda x: fn(x, topk, **kw))(X)
    assert str(traced.value) == str(eager.value)
    assert ffi_calls == [], "an FFI call was built although validation failed"


@over(FUSED)
@pytest.mark.parametrize("case", ["bitmap_dense", "indices_shape", "int64", "format"])
def test_fused_only_rules_under_jit(fn, case, ffi_calls):
    kw = {
        "bitmap_dense": dict(routing_map_format="bitmap_u8", topk_indices_dtype=jnp.int32),
        "indices_shape": dict(topk_indices=jnp.zeros((T, 3), jnp.int32)),
        "int64": dict(topk_indices_dtype=jnp.int64),
        "format": dict(routing_map_format="bitmap_u16"),
    }[case]
    with pytest.raises(ValueError) as eager:
        fn(X, 2, **kw)
    with pytest.raises(ValueError) as jitted:
        jax.jit(lambda x: fn(x, 2, **kw))(X)
    assert str(jitted.value) == str(eager.value)
    assert ffi_calls == []


@over(COMPACT)
def test_int16_large_e_under_jit(fn, ffi_calls):
    logits = jnp.zeros((0, 40000), jnp.float32)
    with pytest.raises(ValueError, match="index_dtype"):
        jax.jit(lambda x: fn(x, 1, index_dtype=jnp.int16))(logits)
    assert ffi_calls == []


@pytest.mark.parametrize("fn", [jr.fused_topk_with_score_function, jr.route_topk])
def test_valid_call_does_use_ffi(fn, ffi_calls):
    """The spy above does see the kernel path on this backend (so its silence means something)."""
    fn(X, 2)
    assert ffi_calls == ["jax_router_fwd"]


@over(ALL)
def test_zero_experts(fn):
    # E = 0 leaves no valid topk
    expect(fn, ValueError, "topk", jnp.zeros((3, 0), jnp.float32), 1)


@over(ALL)
@pytest.mark.parametrize("dtype", ["int16", "int32", np.int16, np.dtype("int32"), jnp.int16],
                         ids=repr)
def test_index_dtype_spellings_accepted(fn, dtype):
    kw, _ = index_kwargs(fn, "dtype", dtype, X, 2)
    _, idx = fn(X, 2, **kw)
    assert idx.dtype == jnp.dtype(dtype)


@over(FUSED)
def test_topk_indices_without_dtype(fn):
    # a string is no index buffer (a list of ints is one, by jnp.asarray's rules)
    expect(fn, TypeError, "topk_indices", X, 2, topk_indices="not an array")
