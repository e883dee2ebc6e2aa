"""The bf16 sigmoid CUDA forward (ffi/router_fwd_sigmoid_bf16.cuh): sigmoid with or without one
bias row, no group-limited routing, bfloat16 logits, E a multiple of 64 up to 512, topk <= 16,
compact outputs, taken for batches of at least min_rows(E) (JR_SIGMOID_BF16_MIN_ROWS). From
E = 256 (E % 128 == 0) two lanes share a token (JR_SIGMOID_BF16_PAIR_MIN_E): E = 256, 384 and
512 take that form, the others one lane a token.

It screens each row on its selection scores truncated to bfloat16 (the bf16 softmax forward's
group maxima and threshold), then ranks the candidates by their exact scores. These tests
compare it with the CPU bit for bit: random and hard rows, rows whose scores cluster or repeat
given the bias, every bias kind (NaN and inf ones send the launch to the exact path), both list
sizes, both index dtypes, every bfloat16 value through its sigmoid table.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from .test_cross_platform import (  # noqa: F401 (cpu_and_cuda: a fixture)
    BIAS_KINDS, F32, assert_same_bits, compact_bits_equal, compact_program, cpu_and_cuda,
    make_bias, make_logits, near_tie_rows, run_on_both)
from .test_grouped_forward import bf16_from_bits
from .test_softmax_screen_forward import screen_rows


def min_rows(E: int) -> int:
    """The kernel's smallest batch for E (SigmoidBf16MinRows in the header)."""
    if E >= 256 and E % 128 == 0:  # two lanes a token
        return 32768 * (E // 256)
    return 16384 * max(1, E // 128)


# (E, topk): Kimi-K2 (384, 8); both list sizes' ends, an odd topk, E not a power of two
SHAPES = [(384, 8), (128, 8), (256, 4), (512, 16), (64, 1), (320, 12), (192, 9)]
CASES = [(s, b) for s in range(len(SHAPES)) for b in (*BIAS_KINDS, None)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES,
                         ids=[f"E{SHAPES[s][0]}-k{SHAPES[s][1]}-{b}" for s, b in CASES])
def test_sigmoid_bf16_bits_equal(cpu_and_cuda, case):
    shape, kind = case
    E, topk = SHAPES[shape]
    seed = 43000 + 10 * shape + (BIAS_KINDS.index(kind) if kind else 9)
    rng = np.random.default_rng(seed)
    x, labels = make_logits(E, seed, jnp.float32, random_rows=min_rows(E) + 37 * (shape % 3))
    extra, extra_labels = screen_rows(E, topk, rng)
    x = np.concatenate([x, extra])
    labels = labels + extra_labels
    bias = make_bias(E, seed, kind) if kind else None
    if bias is not None:
        near = near_tie_rows(E, np.asarray(bias, F32), rng, 32)
        x = np.concatenate([x, near])
        labels = labels + ["scores patterned or clustered given the bias"] * len(near)
    x = x.astype(jnp.bfloat16)
    cot = rng.standard_normal((x.shape[0], topk)).astype(F32)
    index_dtype = jnp.int16 if shape % 2 else jnp.int32
    kw = dict(score_function="sigmoid", scaling_factor=(2.827, None)[shape % 2])
    compact_bits_equal(cpu_and_cuda, topk, kw, index_dtype, x, bias, cot, labels)


@pytest.mark.gpu
def test_sigmoid_bf16_every_value_through_the_table(cpu_and_cuda):
    """Each bfloat16 value (NaN included) at a column whose bias always wins: with k = 1 the
    weight is that value's sigmoid, so every table entry and both clamps are seen."""
    E = 128
    u = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    rng = np.random.default_rng(78)
    x = rng.standard_normal((u.size, E)).astype(jnp.bfloat16)
    col = 37
    x[:, col] = bf16_from_bits(u)
    bias = np.zeros(E, F32)
    bias[col] = 8.0  # beats sigmoid(anything) + 0 from any other expert, when not NaN
    cot = rng.standard_normal((u.size, 1)).astype(F32)
    cpu_out, cuda_out = run_on_both(cpu_and_cuda,
                                    compact_program(1, dict(score_function="sigmoid"), jnp.int32),
                                    x, bias, cot)
    assert (cpu_out["indices"][(u & 0x7FFF) <= 0x7F80, 0] == col).all()
    assert_same_bits(cpu_out, cuda_out, x, [f"bits 0x{int(v):04x} at column {col}" for v in u])


def test_sigmoid_bf16_shared_memory_layout(tmp_path):
    """The kernel's shared-memory layout, checked on the host (tests/sigmoid_bf16_layout.cu):
    every warp's tile aligned, inside its block and clear of the sigmoid table's halves, the
    bias and the other tiles, for every E, both lane forms and three device sizes. (E = 64 once
    sized its block by the tiles alone, so the table's negative half lay past it.)"""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (CI has it: the CUDA build needs it)")
    here = pathlib.Path(__file__).resolve().parent
    exe = tmp_path / "layout"
    subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{here.parent / 'ffi'}",
                    str(here / "sigmoid_bf16_layout.cu"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("bad 0"), out.stdout
