"""The FFI contract between the Python layer and the handlers: the enum values Python sends
are the C++ ones, and a handler rejects a value it does not know instead of reading it as
another."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_router import _ffi
from jax_router.options import OutputMode, RoutingMapFormat, ScoreFunction, map_format_attr

MODULES = [m for m in (_ffi._cpu, _ffi._cuda) if m is not None]


@pytest.mark.skipif(not MODULES, reason="no compiled kernels in this build")
@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_python_enums_are_the_cpp_enums(module):
    values = module.enum_values()
    assert values["score_function"] == {f.name.lower(): int(f) for f in ScoreFunction}
    assert values["output_mode"] == {m.name.lower(): int(m) for m in OutputMode}
    assert values["map_format"] == {f.value: int(map_format_attr(f)) for f in RoutingMapFormat}


def _forward_call(logits, **overrides):
    k = 2
    attrs = dict(topk=np.int64(k), score_function=np.int32(int(ScoreFunction.SIGMOID)),
                 use_pre_softmax=False, num_groups=np.int64(0), group_topk=np.int64(0),
                 scaling_factor=np.float32(1.0), output_mode=np.int32(int(OutputMode.COMPACT)),
                 map_format=np.int32(0), num_bins=np.int64(0))
    attrs.update(overrides)
    T, E = logits.shape
    f32 = jax.ShapeDtypeStruct
    out = (f32((0,), logits.dtype), f32((0,), jnp.bool_), f32((T, k), jnp.float32),
           f32((T, k), jnp.int32), f32((0,), jnp.float32))
    call = jax.ffi.ffi_call(_ffi.FWD_TARGET, out, vmap_method="broadcast_all")
    return call(logits, jnp.zeros((0,), jnp.float32), **attrs)


@pytest.mark.skipif("cpu" not in _ffi.kernel_platforms(), reason="no CPU kernels in this build")
@pytest.mark.parametrize("field,value,message", [
    ("score_function", np.int32(len(ScoreFunction)), "unknown score_function"),
    ("score_function", np.int32(-1), "unknown score_function"),
    ("output_mode", np.int32(len(OutputMode)), "unknown output_mode"),
    ("map_format", np.int32(2), "unknown map_format"),
    ("num_bins", np.int64(4), "jax_router_qb_fwd only"),
    ("num_bins", np.int64(-1), "num_bins out of range"),
])
def test_unknown_enum_values_are_rejected(field, value, message):
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        ok_w, ok_i = _forward_call(logits)[2:4]
        assert ok_i.shape == (4, 2) and np.isfinite(np.asarray(ok_w)).all()
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(_forward_call(logits, **{field: value}))


def test_every_score_function_has_a_reference_activation():
    from jax_router import reference

    x = jnp.linspace(-3.0, 3.0, 7)
    for fn in ScoreFunction:
        assert reference.activation(fn, x).shape == x.shape
