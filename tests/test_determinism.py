"""docs/semantics.md#numerics: outputs are bitwise identical from run to run, and a row's result does not depend on
the batch it is in. Checked on every kernel path (the CUDA fast lane-group path, the general
block path, pre-softmax) and on the backward, at the position a row takes inside a warp or a
thread-pool chunk (shifted batches), on every kernel implementation present (CPU, CUDA); the GPU
adds a run at DeepSeek-V3 size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from . import impls
from .util import random_bias, random_logits

# (id, E, topk, kwargs): the CUDA kernel each one takes is named; the CPU has one path.
PATHS = [
    ("deepseek_fast", 256, 8, dict(score_function="sigmoid", bias=True, num_groups=8,
                                    group_topk=4, scaling_factor=2.5)),
    ("qwen_fast", 130, 6, dict(score_function="softmax")),
    ("general_large_E", 2048, 8, dict(score_function="sqrtsoftplus", bias=True)),
    ("general_large_k", 96, 40, dict(score_function="sigmoid")),
    ("pre_softmax", 64, 5, dict(use_pre_softmax=True)),
]


def _kw(E, kw, seed):
    kw = dict(kw)
    if kw.pop("bias", False):
        kw["expert_bias"] = random_bias(seed, E)
    return kw


def _run(impl, logits, topk, kw):
    """Compact, dense and bitmap forwards plus the logits' gradient, as numpy arrays."""
    w, idx = impl.route_topk(logits, topk, **kw)
    probs, dense = impl.fused_topk_with_score_function(
        logits, topk, topk_indices_dtype=jnp.int32, **kw)
    _, bitmap = impl.fused_topk_with_score_function(
        logits, topk, routing_map_format="bitmap_u8", **kw)
    cot = jnp.cos(jnp.arange(topk, dtype=jnp.float32))
    g = jax.grad(lambda x: jnp.sum(impl.route_topk(x, topk, **kw)[0] * cot))(logits)
    return [np.asarray(a) for a in (w, idx, probs, dense, bitmap, g)]


def assert_same_bits(a, b):
    """Equal bit patterns (NaNs included, whatever the dtype)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    np.testing.assert_array_equal(np.ascontiguousarray(a).view(uint),
                                  np.ascontiguousarray(b).view(uint))


@pytest.mark.parametrize("name,E,topk,kw", PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_bitwise_repeatable_and_batch_independent(kernel_impl, name, E, topk, kw, dtype):
    T = 1031
    logits = random_logits(31, (T, E), dtype)
    # exact ties and non-finite values too: the tie-break must not depend on the batch either
    logits = logits.at[5, :].set(0.5).at[7, 3].set(jnp.nan).at[9, :4].set(jnp.inf)
    kw = _kw(E, kw, 31)
    run = lambda x: _run(kernel_impl, x, topk, kw)
    first = run(logits)
    for _ in range(2):
        for a, b in zip(first, run(logits)):
            assert_same_bits(a, b)
    # the same rows at other offsets (another lane group / warp / thread chunk) and in other
    # company: a shifted window, a single row, and the rows reversed
    for sl in (slice(1, 1 + 517), slice(3, 4), slice(257, T)):
        part = run(logits[sl])
        for a, b in zip(first, part):
            assert_same_bits(a[sl], b)
    rev = run(logits[::-1])
    for a, b in zip(first, rev):
        assert_same_bits(a[::-1], b)


@pytest.mark.gpu
def test_bitwise_repeatable_at_deepseek_size():
    """65536 tokens, five runs of the forward and the backward on the CUDA kernels: identical
    bits (the gpu marker makes a missing GPU a skip, or an error under --require-gpu)."""
    cuda = impls.get("cuda")
    E, topk = 256, 8
    with cuda.on_device():
        logits = random_logits(32, (65536, E), jnp.bfloat16)
        kw = _kw(E, PATHS[0][3], 32)
        first = _run(cuda, logits, topk, kw)
        for _ in range(4):
            for a, b in zip(first, _run(cuda, logits, topk, kw)):
                assert_same_bits(a, b)
