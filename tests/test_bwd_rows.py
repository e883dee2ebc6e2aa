"""The CUDA backward one thread a row (ffi/router_bwd_rows.cuh), taken for batches of at least
16384 rows (JR_BWD_ROWS_MIN_ROWS) without pre-softmax, topk <= 16 and rows of grad_logits of
whole 16-byte vectors up to 256 bytes: every gradient (compact, dense, bytemap) against the CPU
bit for bit, every score function and logits dtype, rows swizzled (whole 128-byte blocks) and
not, topk 1 and 16, a partial last warp tile.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from .test_cross_platform import (  # noqa: F401 (cpu_and_cuda: a fixture)
    F32, assert_same_bits, cpu_and_cuda, make_bias, make_logits, routing_program, run_on_both)

MIN_ROWS = 16384

# (E, topk, options, dtype): Qwen3, DeepSeek-V3's options at E = 128 (groups), Mixtral; then an
# unswizzled row of 9 chunks, a 4-chunk row, topk 1 and 16, every score function and dtype
CONFIGS = [
    (128, 8, dict(score_function="softmax"), jnp.bfloat16),
    (128, 8, dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5,
                  bias=True), jnp.bfloat16),
    (8, 2, dict(score_function="softmax"), jnp.bfloat16),
    (72, 3, dict(score_function="softmax", scaling_factor=1.5), jnp.bfloat16),
    (16, 5, dict(score_function="sigmoid", bias=True), jnp.float32),
    (64, 16, dict(score_function="sqrtsoftplus", bias=True), jnp.float32),
    (128, 4, dict(score_function="sigmoid"), jnp.float16),
    (128, 1, dict(score_function="sigmoid", bias=True), jnp.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(CONFIGS)),
                         ids=[f"E{E}-k{k}-{o['score_function']}-{jnp.dtype(d).name}"
                              for E, k, o, d in CONFIGS])
def test_bwd_rows_bits_equal(cpu_and_cuda, case):
    E, topk, opts, dtype = CONFIGS[case]
    kw = {key: v for key, v in opts.items() if key != "bias"}
    seed = 44000 + case
    rng = np.random.default_rng(seed)
    x, labels = make_logits(E, seed, dtype, random_rows=MIN_ROWS + 7)
    assert x.shape[0] >= MIN_ROWS
    bias = make_bias(E, seed, "random") if opts.get("bias") else None
    cot_k = rng.standard_normal((x.shape[0], topk)).astype(F32)
    cot_e = rng.standard_normal(x.shape).astype(dtype)
    index_dtype = jnp.int16 if case % 2 else jnp.int32
    cpu_out, cuda_out = run_on_both(cpu_and_cuda, routing_program(topk, kw, index_dtype),
                                    x, bias, cot_k, cot_e)
    for name in ("compact grad", "dense grad", "bytemap grad"):
        assert np.count_nonzero(np.asarray(cpu_out[name], F32)) > 0, name
    assert_same_bits(cpu_out, cuda_out, x, labels)
