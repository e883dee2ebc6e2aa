"""The CUDA handlers inside XLA command buffers (docs/semantics.md#jax, "CUDA"): the same
program, with every fusion and custom call captured into CUDA graphs from graphs of one command
on, gives the same bits as with command buffers off. Routing, the plan (its cluster path: 8, 32
and 256 tiles), permute and unpermute, forward and backward. Each setting runs in its own
process, since XLA reads its flags once."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

CAPTURED = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
OFF = "--xla_gpu_enable_command_buffer="

# argv: the output .npz. Floating results are saved as float32 (numpy has no bfloat16 file
# format); the comparison is bit for bit all the same.
SCRIPT = """
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_router as jr

E, K = 256, 8


def moe(logits, x, bias):
    w, i = jr.route_topk(logits, K, score_function="sigmoid", expert_bias=bias, num_groups=8,
                         group_topk=4, scaling_factor=2.5)
    plan = jr.dispatch_plan(i, E)
    y = jr.unpermute(jr.permute(x, plan) * 2, plan, w)
    return y, plan.tokens_per_expert, plan.positions, plan.source


def loss(logits, x, bias):
    return jnp.sum(moe(logits, x, bias)[0].astype(jnp.float32) ** 2)


out = {}
for T in (2048, 8192, 65536):  # 8, 32 and 256 plan tiles
    k1, k2 = jax.random.split(jax.random.key(T))
    logits = jax.random.normal(k1, (T, E), jnp.float32)
    x = jax.random.normal(k2, (T, 64), jnp.float32).astype(jnp.bfloat16)
    bias = jnp.linspace(-0.1, 0.1, E, dtype=jnp.float32)
    y, tpe, pos, src = jax.jit(moe)(logits, x, bias)
    gl, gx = jax.jit(jax.grad(loss, (0, 1)))(logits, x, bias)
    for name, v in (("y", y), ("tpe", tpe), ("pos", pos), ("src", src), ("gl", gl), ("gx", gx)):
        v = np.asarray(v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v)
        out[f"{name}{T}"] = v
np.savez(sys.argv[1], **out)
"""


def run_script(path, xla_flags, platform="cuda"):
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS=platform)
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, timeout=600, env=env)
    return np.load(path)


def test_command_buffers_give_the_same_bits(tmp_path):
    captured = run_script(tmp_path / "captured.npz", CAPTURED)
    off = run_script(tmp_path / "off.npz", OFF)
    assert sorted(captured.files) == sorted(off.files)
    for key in off.files:
        np.testing.assert_array_equal(captured[key], off[key], err_msg=key)
