"""jax.export of functions that call the router: ``jax_router.export_checks()`` is the whole set
of disabled checks needed, a symbolic batch dim works, and the serialized artifact runs in a
fresh process (which registers the targets by importing jax_router)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_router as jr
from jax_router import _ffi

E = 64

pytestmark = pytest.mark.skipif(not _ffi.default_backend_has_kernels(),
                                reason="exports the FFI kernels of this backend")


def _model(x, bias):
    """Every target: router forward (compact, bitmap map) and backward, aux scores fwd/bwd."""
    deepseek = dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5)
    weights, experts = jr.route_topk(x, 8, expert_bias=bias, **deepseek)
    probs, bitmap = jr.fused_topk_with_score_function(x, 4, routing_map_format="bitmap_u8")
    grad = jax.grad(lambda y: jnp.sum(jr.route_topk(y, 8, expert_bias=bias, **deepseek)[0] ** 2))(x)
    aux_grad = jax.grad(lambda y: jnp.sum(
        jr.fused_compute_score_for_moe_aux_loss(y, 4, "softmax")[1] ** 2))(x)
    return weights, experts, probs, bitmap, grad, aux_grad


def _export():
    args = (jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {E}"), jnp.float32),
            jax.ShapeDtypeStruct((E,), jnp.float32))
    return export.export(jax.jit(_model), disabled_checks=jr.export_checks())(*args)


def test_export_checks_name_every_target():
    checks = jr.export_checks()
    expected = [export.DisabledSafetyCheck.custom_call(t) for t in
                (_ffi.FWD_TARGET, _ffi.BWD_TARGET, _ffi.AUX_SCORES_FWD_TARGET,
                 _ffi.AUX_SCORES_BWD_TARGET, _ffi.DISPATCH_PLAN_TARGET, _ffi.PERMUTE_TARGET,
                 _ffi.UNPERMUTE_TARGET, _ffi.UNPERMUTE_BWD_TARGET)]
    assert checks == expected


def test_export_without_the_checks_is_refused():
    """Why export_checks exists: jax.export's default refuses custom calls it does not know."""
    x = jax.ShapeDtypeStruct((4, E), jnp.float32)
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        export.export(jax.jit(lambda x: jr.route_topk(x, 2)))(x)


def test_symbolic_batch_round_trip_in_a_fresh_process(tmp_path):
    exported = _export()
    assert str(exported.in_avals[0].shape[0]) == "b"
    assert all(t in exported.mlir_module() for t in (_ffi.FWD_TARGET, _ffi.BWD_TARGET,
                                                      _ffi.AUX_SCORES_FWD_TARGET,
                                                      _ffi.AUX_SCORES_BWD_TARGET))
    (tmp_path / "model.bin").write_bytes(exported.serialize())
    cases = {}
    for n, rows in enumerate((5, 33)):
        x = jax.random.normal(jax.random.key(n), (rows, E), jnp.float32)
        bias = jax.random.uniform(jax.random.key(100 + n), (E,), jnp.float32) * 0.1
        cases[f"x{n}"], cases[f"bias{n}"] = np.asarray(x), np.asarray(bias)
        for i, out in enumerate(jax.jit(_model)(x, bias)):
            cases[f"out{n}_{i}"] = np.asarray(out)
    np.savez(tmp_path / "cases.npz", **cases)

    script = textwrap.dedent("""
        import sys
        import numpy as np
        from jax import export
        import jax_router  # registers the FFI targets the artifact calls
        exported = export.deserialize(bytearray(open(sys.argv[1] + "/model.bin", "rb").read()))
        cases = np.load(sys.argv[1] + "/cases.npz")
        for n in (0, 1):
            outs = exported.call(cases[f"x{n}"], cases[f"bias{n}"])
            for i, out in enumerate(outs):
                np.testing.assert_array_equal(np.asarray(out), cases[f"out{n}_{i}"])
        print("round trip ok")
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "round trip ok" in done.stdout
