"""Small driver for compute-sanitizer: runs every CUDA router, quantile-balancing, aux-score and
dispatch kernel once through the public API.

    compute-sanitizer --tool memcheck  --kernel-name kns=jax_router python3 benchmarks/sanitize_gpu.py
    compute-sanitizer --tool racecheck --kernel-name kns=jax_router python3 benchmarks/sanitize_gpu.py

    compute-sanitizer --tool memcheck  --kernel-name kns=jax_router python3 benchmarks/sanitize_gpu.py grouped
    compute-sanitizer --tool memcheck  --kernel-name kns=jax_router python3 benchmarks/sanitize_gpu.py thread

(the last forms: the grouped forward's cases only, or those of every one-thread-a-token
forward: grouped, softmax screen, bf16 sigmoid; and the backward one thread a row). Covers those
(batches that take them, their exact paths, partial tiles),
the fast forward (every lane layout, grouped and not, odd E, partial lanes), the general forward
(large topk, pre-softmax, E > 1024, odd group sizes), all output modes (compact, dense indices,
bytemap, bitmap) and the backward (compact and dense cotangents, pre-softmax), with small token
counts (odd, so the last tile is partial) and a few non-finite logits.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_router as jr

CASES = [
    # (E, topk, options)
    (8, 2, dict(score_function="softmax")),
    (8, 8, dict(score_function="softmax")),
    (6, 5, dict(score_function="sigmoid")),  # the small-E kernel, E < 8: scalar loads
    (7, 3, dict(score_function="sqrtsoftplus", scaling_factor=1.5)),
    (24, 3, dict(score_function="sigmoid")),
    (64, 4, dict(score_function="sqrtsoftplus", num_groups=4, group_topk=2)),
    (128, 8, dict(score_function="softmax")),
    (130, 7, dict(score_function="sqrtsoftplus", scaling_factor=1.5)),
    (256, 8, dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5)),
    (256, 40, dict(score_function="softmax")),
    (384, 8, dict(score_function="sigmoid")),
    (512, 10, dict(score_function="softmax")),
    (896, 16, dict(score_function="sigmoid")),
    (896, 16, dict(score_function="sigmoid", num_groups=8, group_topk=4)),
    (64, 4, dict(score_function="softmax", use_pre_softmax=True)),
    (300, 300, dict(score_function="softmax")),
    (2000, 24, dict(score_function="sigmoid")),
]


def run(E, topk, opts, T=37, dtype=jnp.bfloat16):
    x = 2.0 * jax.random.normal(jax.random.key(E * 31 + topk), (T, E), jnp.float32)
    x = x.at[0, 0].set(jnp.nan).at[1, :].set(0.0).at[2, 1].set(-jnp.inf)
    x = x.astype(dtype)
    bias = None
    if opts.get("score_function") in ("sigmoid", "sqrtsoftplus"):
        bias = 0.1 * jax.random.normal(jax.random.key(E), (E,), jnp.float32)
    outs = []
    w, i = jr.route_topk(x, topk, expert_bias=bias, **opts)
    outs += [w, i]
    for fmt in ("bytemap", "bitmap_u8"):
        outs += list(jr.fused_topk_with_score_function(x, topk, expert_bias=bias,
                                                       routing_map_format=fmt, **opts))
    outs += list(jr.fused_topk_with_score_function(x, topk, expert_bias=bias,
                                                   topk_indices_dtype=jnp.int16, **opts))
    r = jnp.cos(jnp.arange(topk, dtype=jnp.float32))
    g1 = jax.grad(lambda x: jnp.sum(
        jr.route_topk(x, topk, expert_bias=bias, **opts)[0] * r))(x)
    rd = jnp.sin(jnp.arange(E, dtype=jnp.float32))
    g2 = jax.grad(lambda x: jnp.sum(jr.fused_topk_with_score_function(
        x, topk, expert_bias=bias, **opts)[0].astype(jnp.float32) * rd))(x)
    outs += [g1, g2]
    jax.block_until_ready(outs)
    return outs


def run_grouped():
    """The grouped forward (router_fwd_grouped.cuh): DeepSeek-V3's shape in bf16 with at least
    16384 rows (the last warp tile partial), a NaN row (its exact path), with and without a bias
    and a non-finite one, the vector and the scalar stores."""
    T, E = 16384 + 37, 256
    x = 2.0 * jax.random.normal(jax.random.key(256), (T, E), jnp.float32)
    x = x.at[0, 0].set(jnp.nan).at[1, :].set(0.0).at[2, 1].set(-jnp.inf).astype(jnp.bfloat16)
    bias = 0.1 * jax.random.normal(jax.random.key(E), (E,), jnp.float32)
    outs = []
    for b in (bias, None, bias.at[3].set(jnp.inf)):
        for topk, gk, idx in ((8, 4, jnp.int32), (6, 3, jnp.int16), (2, 1, jnp.int32)):
            opts = dict(score_function="sigmoid", num_groups=8, group_topk=gk, scaling_factor=2.5)
            outs += list(jr.route_topk(x, topk, expert_bias=b, index_dtype=idx, **opts))
            r = jnp.cos(jnp.arange(topk, dtype=jnp.float32))
            outs.append(jax.grad(lambda x: jnp.sum(
                jr.route_topk(x, topk, expert_bias=b, **opts)[0] * r))(x))
    jax.block_until_ready(outs)


def run_softmax_screen():
    """The softmax screen forward (router_fwd_softmax_screen.cuh) at batches that take it: both
    list sizes, E from 64 to 512 (one lane a token and two), bfloat16 and float32 logits, a row
    with a group of NaNs only (its exact path), an all -inf row (every logit a candidate),
    partial last warp tiles, the vector and the scalar stores."""
    outs = []
    for T, E, topk, idx, dt in ((16384 + 5, 128, 8, jnp.int32, jnp.bfloat16),
                                (65536 + 31, 512, 10, jnp.int16, jnp.bfloat16),
                                (16384 + 1, 64, 16, jnp.int32, jnp.bfloat16),
                                (49152 + 7, 384, 3, jnp.int32, jnp.bfloat16),
                                (16384 + 3, 128, 8, jnp.int32, jnp.float32),
                                (32768 + 9, 256, 12, jnp.int16, jnp.float32)):
        x = 2.0 * jax.random.normal(jax.random.key(E + topk), (T, E), jnp.float32)
        x = x.at[0, 6::16].set(jnp.nan).at[1, :].set(-jnp.inf).at[2, :].set(0.0)
        x = x.astype(dt)
        outs += list(jr.route_topk(x, topk, index_dtype=idx, scaling_factor=1.5))
        r = jnp.cos(jnp.arange(topk, dtype=jnp.float32))
        outs.append(jax.grad(lambda x: jnp.sum(jr.route_topk(x, topk)[0] * r))(x))
    jax.block_until_ready(outs)


def run_sigmoid_bf16():
    """The bf16 sigmoid forward (router_fwd_sigmoid_bf16.cuh) at batches that take it: both list
    sizes, one lane a token and two, with and without a bias, a NaN row and a non-finite bias
    (the exact paths), partial last warp tiles, the vector and the scalar stores."""
    outs = []
    for T, E, topk in ((32768 + 5, 384, 8), (16384 + 3, 64, 16), (65536 + 1, 512, 5),
                       (16384 + 9, 128, 8), (32768 + 3, 256, 12)):
        x = 2.0 * jax.random.normal(jax.random.key(E + topk), (T, E), jnp.float32)
        x = x.at[0, 3].set(jnp.nan).at[1, :].set(-jnp.inf).astype(jnp.bfloat16)
        bias = 0.1 * jax.random.normal(jax.random.key(E), (E,), jnp.float32)
        for b in (bias, None, bias.at[2].set(jnp.nan)):
            opts = dict(score_function="sigmoid", expert_bias=b, scaling_factor=2.5)
            outs += list(jr.route_topk(x, topk, **opts))
            r = jnp.cos(jnp.arange(topk, dtype=jnp.float32))
            outs.append(jax.grad(lambda x: jnp.sum(jr.route_topk(x, topk, **opts)[0] * r))(x))
    jax.block_until_ready(outs)


def run_bwd_rows():
    """The backward one thread a row (router_bwd_rows.cuh) at batches that take it: swizzled
    and plain rows, compact and dense cotangents, a partial last warp tile."""
    outs = []
    for E, topk, fn in ((128, 8, "softmax"), (72, 3, "softmax"), (8, 2, "softmax"),
                        (128, 8, "sigmoid")):
        x = jax.random.normal(jax.random.key(E), (16384 + 5, E), jnp.float32).astype(jnp.bfloat16)
        r = jnp.cos(jnp.arange(topk, dtype=jnp.float32))
        outs.append(jax.grad(lambda x: jnp.sum(jr.route_topk(x, topk, score_function=fn)[0] * r))(x))
        outs.append(jax.grad(lambda x: jnp.sum(jr.fused_topk_with_score_function(
            x, topk, score_function=fn)[0].astype(jnp.float32) ** 2))(x))
    jax.block_until_ready(outs)


# Aux-score kernels: (E, topk) for the register kernels' argmax (k <= 16) and radix (k > 16)
# selections, the largest register layout, and the general kernel (E > 1024).
AUX_CASES = [(7, 3), (130, 8), (256, 20), (1024, 16), (1100, 40)]


def run_aux(E, topk, dtype):
    x = 2.0 * jax.random.normal(jax.random.key(E + topk), (37, E), jnp.float32)
    x = x.at[0, 0].set(jnp.nan).at[1, :].set(0.0).at[2, 1].set(-jnp.inf).astype(dtype)
    outs = []
    for fn in ("softmax", "sigmoid", "sqrtsoftplus"):
        for fmt in ("bytemap", "bitmap_u8"):
            outs += list(jr.fused_compute_score_for_moe_aux_loss(x, topk, fn, fmt))
        w = jnp.sin(jnp.arange(E, dtype=jnp.float32))
        outs.append(jax.grad(lambda x: jnp.sum(
            jr.fused_compute_score_for_moe_aux_loss(x, topk, fn)[1] * w))(x))
    jax.block_until_ready(outs)


# Quantile balancing: (E, topk) for the fast kernel's layouts (small, partial lanes, 896/16) and
# the general kernel (topk + 1 > 32, E > 1024), with traced-looking bounds outside the scores.
QB_CASES = [(8, 7), (37, 5), (896, 16), (1024, 32), (1100, 8)]


def run_qb(E, topk, dtype):
    x = 2.0 * jax.random.normal(jax.random.key(E + 7 * topk), (37, E), jnp.float32)
    x = x.at[0, 0].set(jnp.nan).at[1, :].set(0.0).at[2, 1].set(-jnp.inf).astype(dtype)
    bias = 0.1 * jax.random.normal(jax.random.key(E), (E,), jnp.float32)
    outs = []
    for bounds in ((-1.0, 1.0), (5.0, 6.0), (-6.0, -5.0)):
        b = jnp.array(bounds, jnp.float32)
        outs += list(jr.route_topk_qb(x, topk, bias, b, 100))
        outs += list(jr.fused_topk_with_score_function_qb(x, topk, bias, b, 7,
                                                          routing_map_format="bitmap_u8"))
    r = jnp.cos(jnp.arange(topk, dtype=jnp.float32))
    outs.append(jax.grad(lambda x: jnp.sum(jr.route_topk_qb(x, topk, bias, b, 3)[0] * r))(x))
    jax.block_until_ready(outs)


# Dispatch kernels: (T, topk, E, H, capacity) for the plan's shared tables with 16, 8 and 2
# warps (E = 8 / 37, 600, 1500), its global-table rank path (E = 7000) and global counts
# (E = 13000), several plan tiles and groups (79 tiles: clusters of 8 with a block past the
# last tile; 274 tiles: the zero and count kernels), capacity drops, invalid ids, the vector
# (H * bytes % 16 == 0) and element-by-element row paths, T = 0.
DISPATCH_CASES = [(37, 2, 8, 64, None), (3000, 4, 37, 13, 90), (3000, 4, 600, 16, None),
                  (1500, 3, 1500, 24, 2), (1500, 3, 7000, 24, None), (700, 2, 13000, 40, 1),
                  (20000, 8, 256, 8, None), (70000, 8, 256, 8, 1500), (0, 2, 8, 16, 3)]


def run_dispatch(T, topk, E, H, capacity, dtype):
    key = jax.random.key(T + E)
    ids = jax.random.randint(key, (T, topk), -2, E + 2, jnp.int32)
    x = jax.random.normal(key, (T, H), jnp.float32).astype(dtype)
    w = jax.random.uniform(key, (T, topk), jnp.float32)
    plan = jr.dispatch_plan(ids, E, capacity=capacity)
    rows = jr.permute(x, plan)
    out = jr.unpermute(rows, plan, w)
    gx, gw = jax.grad(lambda x, w: jnp.sum(jr.unpermute(
        jr.permute(x, plan) * 2, plan, w).astype(jnp.float32)), (0, 1))(x, w)
    jax.block_until_ready([plan, rows, out, gx, gw])


def main():
    print(jax.devices())
    run_grouped()
    print("ok grouped forward", flush=True)
    if sys.argv[1:] == ["grouped"]:
        return
    run_bwd_rows()
    print("ok backward one thread a row", flush=True)
    run_softmax_screen()
    print("ok softmax screen forward", flush=True)
    run_sigmoid_bf16()
    print("ok bf16 sigmoid forward", flush=True)
    if sys.argv[1:] == ["thread"]:
        return
    for E, topk in QB_CASES:
        for dtype in (jnp.bfloat16, jnp.float32):
            run_qb(E, topk, dtype)
        print(f"ok qb E={E} topk={topk}", flush=True)
    for E, topk, opts in CASES:
        for dtype in (jnp.bfloat16, jnp.float32):
            run(E, topk, opts, dtype=dtype)
        print(f"ok E={E} topk={topk} {opts}", flush=True)
    for E, topk in AUX_CASES:
        for dtype in (jnp.bfloat16, jnp.float32):
            run_aux(E, topk, dtype)
        print(f"ok aux scores E={E} topk={topk}", flush=True)
    for case in DISPATCH_CASES:
        for dtype in (jnp.bfloat16, jnp.float32):
            run_dispatch(*case, dtype)
        print(f"ok dispatch T, topk, E, H, capacity = {case}", flush=True)
    print("sanitize_gpu: all cases ran")


if __name__ == "__main__":
    main()
