"""The grouped CUDA forward (ffi/router_fwd_grouped.cuh): DeepSeek-V3's shape with bfloat16
logits, compact outputs, taken for batches of at least 16384 rows (JR_GROUPED_MIN_ROWS).

Its sigmoid is a table lookup whose exactness rests on three facts about routing_math.h's
sigmoid on bfloat16 inputs, checked here on the CPU kernels (so CI checks them): it is 0.5 for
every magnitude up to bf16 0x33C0, 1 from 16.75 up and 0 from -89 down, i.e. every non-NaN
bfloat16 logit has the sigmoid of its magnitude clamped into [0x33C0, 0x42B2]. The GPU tests
then compare the kernel with the CPU bit for bit on batches large enough to take it: random
rows with the hard rows of test_cross_platform.py, every bfloat16 value, every bias kind and
the (topk, group_topk) pairs the kernel takes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from . import impls
from .test_cross_platform import (  # noqa: F401 (cpu_and_cuda: a fixture)
    BIAS_KINDS, F32, assert_same_bits, compact_bits_equal, compact_program, cpu_and_cuda,
    make_bias, make_logits, near_tie_rows, run_on_both)

# The kernel's band of bfloat16 magnitudes (kSigLo, kSigHi in sigmoid_table.cuh) and its
# smallest batch (JR_GROUPED_MIN_ROWS).
SIG_LO, SIG_HI = 0x33C0, 0x42B2
MIN_ROWS = 16384


def all_bf16_bits() -> np.ndarray:
    """Every bfloat16 bit pattern that is not a NaN, as uint16."""
    u = np.arange(1 << 16, dtype=np.uint32)
    return u[(u & 0x7FFF) <= 0x7F80].astype(np.uint16)


def bf16_from_bits(u: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # NaN bit patterns stay NaN
        return (u.astype(np.uint32) << 16).view(np.float32).astype(jnp.bfloat16)


def test_sigmoid_is_constant_outside_the_table_band():
    """sigmoid(x) == sigmoid(sign(x) * clamp(|x|, band)) for every non-NaN bfloat16 x, on the
    CPU kernels (k = 1 of E = 1 without scaling: the weight is the sigmoid itself)."""
    cpu = impls.get("cpu")
    if cpu is None:
        pytest.skip(impls.missing_reason("cpu"))
    u = all_bf16_bits()
    clamped = (u & 0x8000) | np.clip(u & 0x7FFF, SIG_LO, SIG_HI).astype(np.uint16)
    x = np.stack([bf16_from_bits(u), bf16_from_bits(clamped)]).reshape(2 * u.size, 1)
    w = np.asarray(cpu.jit(lambda x: cpu.route_topk(x, 1, score_function="sigmoid")[0])(x))
    w = w.reshape(2, u.size).view(np.uint32)
    moved = u != clamped
    assert moved.sum() > 20000 and (~moved).sum() > 7000  # both sides of the band are covered
    differ = np.nonzero(w[0] != w[1])[0]
    assert differ.size == 0, (
        f"{differ.size} bfloat16 values have a sigmoid other than their clamped magnitude's, "
        f"the first bits 0x{int(u[differ[0]]):04x}: the grouped CUDA forward's table is wrong")
    # the three values the band's edges stand for
    edge = w[1].view(np.float32)
    assert set(np.unique(edge[(u & 0x7FFF) <= SIG_LO])) == {0.5}
    assert set(np.unique(edge[(u & 0x7FFF) >= SIG_HI])) == {0.0, 1.0}


# ---- the kernel against the CPU (GPU) --------------------------------------------------------

# (topk, group_topk): DeepSeek-V3's (8, 4), m = 1 with k = 8 and k = 4, m = 2 with fewer groups,
# k = 6 (no vector stores)
GROUPINGS = [(8, 4), (8, 8), (4, 4), (2, 1), (6, 3), (1, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GROUPINGS) * 2),
                         ids=[f"k{k}-g{g}-{b}" for (k, g) in GROUPINGS for b in ("bias", "nobias")])
def test_grouped_bits_equal(cpu_and_cuda, case):
    topk, group_topk = GROUPINGS[case // 2]
    with_bias = case % 2 == 0
    seed = 31000 + case
    x, labels = make_logits(256, seed, jnp.bfloat16, random_rows=MIN_ROWS + 37)
    bias = make_bias(256, seed, BIAS_KINDS[case % 4]) if with_bias else None
    rng = np.random.default_rng(seed + 1)
    if bias is not None:
        extra = near_tie_rows(256, np.asarray(bias, F32), rng, 32)
        x = np.concatenate([x, extra.astype(x.dtype)])
        labels = labels + ["scores patterned or clustered given the bias"] * len(extra)
    assert x.shape[0] >= MIN_ROWS
    cot = rng.standard_normal((x.shape[0], topk)).astype(F32)
    index_dtype = jnp.int16 if case % 3 == 2 else jnp.int32
    kw = dict(score_function="sigmoid", num_groups=8, group_topk=group_topk, scaling_factor=2.5)
    compact_bits_equal(cpu_and_cuda, topk, kw, index_dtype, x, bias, cot, labels)


@pytest.mark.gpu
def test_every_bf16_value_through_the_table(cpu_and_cuda):
    """Each bfloat16 value (NaN included) at a column whose bias always wins its group: with
    k = 1 of one kept group the weight is that value's sigmoid, so every table entry and both
    clamps are seen, against the CPU."""
    u = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    rng = np.random.default_rng(77)
    x = rng.standard_normal((u.size, 256)).astype(jnp.bfloat16)
    col = 37
    x[:, col] = bf16_from_bits(u)
    bias = np.zeros(256, F32)
    bias[col] = 8.0  # beats sigmoid(anything) + 0 from any other expert, when not NaN
    kw = dict(score_function="sigmoid", num_groups=8, group_topk=1)
    cot = rng.standard_normal((u.size, 1)).astype(F32)
    cpu_out, cuda_out = run_on_both(cpu_and_cuda, compact_program(1, kw, jnp.int32), x, bias, cot)
    idx = cpu_out["indices"][:, 0]
    assert (idx[(u & 0x7FFF) <= 0x7F80] == col).all()
    assert_same_bits(cpu_out, cuda_out, x, [f"bits 0x{int(v):04x} at column {col}" for v in u])


@pytest.mark.gpu
def test_all_tied_and_zero_rows(cpu_and_cuda):
    """Rows whose every expert ties (zeros, a constant, a repeated group) in a large batch:
    every kept expert is a candidate, the list keeps the lowest ids."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((MIN_ROWS, 256)).astype(F32)
    x[::3] = 0.0
    x[1::7] = -0.0
    x[2::11] = 1.25
    x[4::13] = np.resize(rng.standard_normal(32).astype(F32), 256)
    x = x.astype(jnp.bfloat16)
    kw = dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5)
    cot = rng.standard_normal((MIN_ROWS, 8)).astype(F32)
    for bias in (None, np.zeros(256, F32), make_bias(256, 9, "ties")):
        cpu_out, cuda_out = run_on_both(cpu_and_cuda, compact_program(8, kw, jnp.int32), x, bias,
                                        cot)
        assert_same_bits(cpu_out, cuda_out, x, ["row"] * MIN_ROWS)
        if bias is None:
            np.testing.assert_array_equal(cpu_out["indices"][0], [0, 1, 2, 3, 4, 5, 6, 7])
