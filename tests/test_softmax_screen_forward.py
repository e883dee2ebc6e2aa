"""The softmax screen CUDA forward (ffi/router_fwd_softmax_screen.cuh): softmax without
pre-softmax on bfloat16 logits (float32 ones up to E = 256), E a multiple of 64 up to 512,
topk <= 16, compact outputs, taken for batches of at least 16384 rows times max(1, E // 128)
(JR_SOFTMAX_SCREEN_MIN_ROWS).

It screens each row with the maxima of 2P groups of its raw logits (P = 8 for topk <= 8, else
16; group (a, h) holds the logits 2w + h with w % P == a), takes the topk-th largest maximum as a
threshold and ranks only the logits at or above it. These tests compare it with the CPU bit for
bit on random and hard rows and on rows built against the screen: ties at the threshold, +0 and
-0 there, groups of NaNs only (the exact path), infinities, every logit a candidate; every list
size and accumulator count, both index dtypes, N-d leading dims and partial warp tiles. From
E = 256 (E % 128 == 0) two lanes share a token (JR_SOFTMAX_SCREEN_PAIR_MIN_E): E = 256, 384 and
512 take that form, the others one lane a token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .test_cross_platform import (F32, assert_same_bits, compact_bits_equal,  # noqa: F401
                                  compact_program, cpu_and_cuda, make_logits, routing_program,
                                  run_on_both)

NAN, INF = F32(np.nan), F32(np.inf)


def min_rows(E: int) -> int:
    """The kernel's smallest batch for E (SoftmaxScreenMinRows in the header)."""
    return 16384 * max(1, E // 128)


def screen_rows(E: int, topk: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Rows (float32 [R, E], exact in bfloat16) aimed at the screen's threshold and groups."""
    P = 8 if topk <= 8 else 16
    e = np.arange(E)
    rows, labels = [], []

    def add(label, row):
        rows.append(np.asarray(row, F32))
        labels.append(label)

    def shuffled(v):
        return v[rng.permutation(E)]

    for ties in (1, 2, topk, 3 * topk):
        # topk - 1 clear winners, then `ties` copies of the threshold value, the rest below
        v = np.concatenate([np.arange(topk - 1, 0, -1) + 4.0, np.full(ties, 2.5),
                            rng.uniform(-4, 2, E)])[:E]
        add(f"{ties} tied at the topk-th value", shuffled(v))
    v = np.concatenate([np.arange(topk - 1, 0, -1) + 1.0,
                        np.where(rng.random(2 * topk) < 0.5, F32(0.0), F32(-0.0)),
                        -rng.uniform(1, 2, E)])[:E]
    add("+0 and -0 at the threshold", shuffled(v))
    for a, h in ((3, 0), (P - 1, 1), (0, 0)):
        v = rng.standard_normal(E).astype(F32)
        v[((e // 2) % P == a) & (e % 2 == h)] = NAN
        add(f"group ({a}, {h}) all NaN", v)
    v = rng.standard_normal(E).astype(F32)
    v[(e // 2) % P == 5] = NAN
    add("two groups all NaN", v)
    v = rng.standard_normal(E).astype(F32)
    v[rng.random(E) < 0.9] = NAN
    add("90% NaN", v)
    v = np.full(E, -INF)
    v[rng.choice(E, topk // 2, replace=False)] = 1.0
    add("fewer numbers than topk among -inf", v)
    v = rng.standard_normal(E).astype(F32)
    v[rng.choice(E, topk + 1, replace=False)] = INF
    add("topk + 1 at +inf", v)
    add("every logit a candidate (constant -1)", np.full(E, -1.0))
    v = rng.standard_normal(E).astype(F32)
    v[(e // 2) % P == 2] = 9.0  # one accumulator's groups hold every large value
    add("the large logits in one group pair", v)
    add("ascending ids", e.astype(F32) / E)
    add("descending ids", -e.astype(F32) / E)
    return np.stack(rows), labels


def softmax_program(topk, index_dtype, scaling):
    return compact_program(topk, dict(score_function="softmax", scaling_factor=scaling),
                           index_dtype)


# (E, topk): Qwen3 (128, 8) and Qwen3-Next (512, 10); the smallest and largest E, topk at both
# list sizes' ends (1, 8 and 9, 16), an odd topk, E a multiple of 64 but not a power of two
SHAPES = [(128, 8), (512, 10), (64, 1), (64, 16), (128, 2), (192, 5), (256, 9), (384, 8),
          (512, 16), (320, 12)]


# float32 logits take the kernel up to E = 256 (kSoftmaxF32MaxE): the screen runs on their
# values rounded toward zero to bfloat16, the ranking on the float32 values
F32_SHAPES = [(E, k) for E, k in SHAPES if E <= 256]
CASES = [(s, "bf16") for s in range(len(SHAPES))] + \
        [(SHAPES.index(sh), "f32") for sh in F32_SHAPES]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dt", CASES, ids=[f"E{SHAPES[s][0]}-k{SHAPES[s][1]}-{d}"
                                                 for s, d in CASES])
def test_softmax_screen_bits_equal(cpu_and_cuda, shape, dt):
    E, topk = SHAPES[shape]
    seed = 41000 + shape + (500 if dt == "f32" else 0)
    rng = np.random.default_rng(seed)
    x, labels = make_logits(E, seed, jnp.float32, random_rows=min_rows(E) + 37 * (shape % 3))
    extra, extra_labels = screen_rows(E, topk, rng)
    x = np.concatenate([x, extra]).astype(jnp.bfloat16 if dt == "bf16" else jnp.float32)
    labels = labels + extra_labels
    assert x.shape[0] >= min_rows(E)
    cot = rng.standard_normal((x.shape[0], topk)).astype(F32)
    index_dtype = jnp.int16 if shape % 2 else jnp.int32
    scaling = (None, 2.5)[shape % 2]
    compact_bits_equal(cpu_and_cuda, topk, dict(score_function="softmax", scaling_factor=scaling),
                       index_dtype, x, None, cot, labels)


@pytest.mark.gpu
@pytest.mark.parametrize("lead", [(3, 5, 1093), (16385,), (2, 8192)])
def test_softmax_screen_leading_dims(cpu_and_cuda, lead):
    """N-d leading dims and batches that end in a partial warp tile (16395 and 16385 rows)."""
    E, topk = 128, 8
    rng = np.random.default_rng(sum(lead))
    x = (2.0 * rng.standard_normal(lead + (E,))).astype(jnp.bfloat16)
    cot = rng.standard_normal(lead + (topk,)).astype(F32)
    cpu_out, cuda_out = run_on_both(cpu_and_cuda, softmax_program(topk, jnp.int32, 1.5), x, None,
                                    cot)
    assert cpu_out["indices"].shape == lead + (topk,)
    flat = {k: v.reshape((-1,) + v.shape[len(lead):]) for k, v in cpu_out.items()}
    flat_cuda = {k: v.reshape((-1,) + v.shape[len(lead):]) for k, v in cuda_out.items()}
    assert_same_bits(flat, flat_cuda, x.reshape(-1, E), ["row"] * flat["weights"].shape[0])


@pytest.mark.gpu
def test_softmax_screen_every_value_at_the_threshold(cpu_and_cuda):
    """Every bfloat16 value (NaN included) beside a copy of itself in a fixed row: the value is
    the threshold, a candidate or neither, for all 65536 patterns."""
    E, topk = 128, 8
    u = np.arange(1 << 16, dtype=np.uint32)
    vals = (u << 16).view(np.float32)
    rng = np.random.default_rng(3)
    x = np.empty((u.size, E), F32)
    x[:] = rng.standard_normal(E).astype(F32)  # a fixed background row
    x[:, 17] = vals
    x[:, 18] = np.where(np.isnan(vals), F32(0.0), vals)  # a tie with 17 (17 wins it)
    with np.errstate(invalid="ignore"):  # NaN bit patterns stay NaN
        x = x.astype(jnp.bfloat16)
    cot = rng.standard_normal((u.size, topk)).astype(F32)
    cpu_out, cuda_out = run_on_both(cpu_and_cuda, softmax_program(topk, jnp.int32, None), x,
                                    None, cot)
    assert_same_bits(cpu_out, cuda_out, x, [f"bits 0x{int(v):04x} at 17, 18" for v in u])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(128, 8, "bf16"), (512, 10, "bf16"), (64, 16, "bf16"),
                                   (128, 8, "f32"), (256, 10, "f32")],
                         ids=lambda s: f"E{s[0]}-k{s[1]}-{s[2]}")
def test_softmax_screen_every_output(cpu_and_cuda, shape):
    """Every output format and the gradients through each on batches whose compact outputs take
    the kernel (dense ones take the fast forward): the choice of kernel by format cannot change
    a bit."""
    E, topk, dt = shape
    dtype = jnp.bfloat16 if dt == "bf16" else jnp.float32
    seed = 42000 + E + topk
    rng = np.random.default_rng(seed)
    x, labels = make_logits(E, seed, jnp.float32, random_rows=min_rows(E) + 5)
    extra, extra_labels = screen_rows(E, topk, rng)
    x = np.concatenate([x, extra]).astype(dtype)
    labels = labels + extra_labels
    cot_k = rng.standard_normal((x.shape[0], topk)).astype(F32)
    cot_e = rng.standard_normal(x.shape).astype(dtype)
    kw = dict(score_function="softmax", use_pre_softmax=False, scaling_factor=1.5)
    cpu_out, cuda_out = run_on_both(cpu_and_cuda, routing_program(topk, kw, jnp.int32),
                                    x, None, cot_k, cot_e)
    assert np.count_nonzero(np.asarray(cpu_out["dense probs"], F32)) > 0
    assert np.count_nonzero(cpu_out["bitmap_u8 map"]) > 0
    assert_same_bits(cpu_out, cuda_out, x, labels)
