"""Aux-loss helpers: fused against the jitted pure-JAX reference, one table (any backend).

Rows, for each score function and logits dtype at T tokens and E experts (default 65536 x 256,
topk 8):

- scores fwd:     ``fused_compute_score_for_moe_aux_loss`` -> bool map + float32 scores;
- scores fwd+bwd: ``jax.grad`` of ``sum(scores * r)`` w.r.t. the logits;
- loss fwd / fwd+bwd: ``fused_moe_aux_loss`` on float32 probs (JAX ops on every backend, so
  "fused" and reference are the same program; listed for its time against the byte floor).

Timing and the byte floor follow benchmarks/bench_gpu.py (rotating input sets larger than the
L2, median of many back-to-back calls, floor = bytes that must move / measured copy bandwidth).

    python3 benchmarks/bench_aux.py                       # 65536 x 256, bf16 and f32
    python3 benchmarks/bench_aux.py --tokens 4096 --dtypes bf16
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax_router as jr  # noqa: E402
from bench_gpu import DTYPES, L2_BYTES, copy_bandwidth, many, time_call  # noqa: E402

FNS = ("softmax", "sigmoid", "sqrtsoftplus")


def scores_fn(fn, topk, impl):
    if impl == "ref":
        return lambda x: jr.reference.fused_compute_score_for_moe_aux_loss(x, topk, fn)
    return lambda x: jr.fused_compute_score_for_moe_aux_loss(x, topk, fn, implementation="ffi")


def scores_grad_fn(fn, topk, impl):
    f = scores_fn(fn, topk, impl)
    return jax.grad(lambda x, r: jnp.sum(f(x)[1] * r))


def loss_fn(T, E, topk):
    return lambda p, t: jr.fused_moe_aux_loss(p, t, T, E, topk, 1e-2)


def row(name, fused_us, floor_us, ref_us=None):
    ref = f"{ref_us:9.1f} {ref_us / fused_us:7.1f}x" if ref_us is not None else f"{'-':>9} {'-':>8}"
    return f"{name:<34} {fused_us:9.1f} {floor_us:8.1f} {fused_us / floor_us:6.2f} {ref}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dtypes", default="bf16,f32")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    T, E, k = args.tokens, args.experts, args.topk
    dev = jax.devices()[0]
    bw = copy_bandwidth()
    print(f"# {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, T={T} E={E} "
          f"topk={k}, copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'row':<34} {'fused us':>9} {'floor':>8} {'x flr':>6} {'ref us':>9} {'speedup':>8}")
    budget = 3.0
    problems = 0
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        b = jnp.dtype(dtype).itemsize
        sets = int(min(16, max(2, math.ceil(2 * L2_BYTES / (T * E * b)))))
        xs = [(2.0 * jax.random.normal(jax.random.key(s), (T, E))).astype(dtype)
              for s in range(sets)]
        rs = [jax.random.normal(jax.random.key(100 + s), (T, E), jnp.float32)
              for s in range(sets)]
        for fn in FNS:
            fused, ref = scores_fn(fn, k, "ffi"), scores_fn(fn, k, "ref")
            (m, s), (rm, rsc) = jax.jit(fused)(xs[0]), jax.jit(ref)(xs[0])
            if not (bool(jnp.allclose(s, rsc, rtol=1e-5, atol=1e-7))
                    and float(jnp.mean(m == rm)) > 0.999):
                print(f"MISMATCH {fn} {dname}")
                problems += 1
            t = time_call(many(fused, 1), xs, args.reps, budget) / sets
            tr = time_call(many(ref, 1), xs, max(3, args.reps // 3), budget) / sets
            floor = (T * E * b + T * E * 4 + T * E) / bw  # logits in, scores + bool map out
            print(row(f"scores fwd   {fn:<12} {dname}", 1e6 * t, 1e6 * floor, 1e6 * tr))
            gf, gr = scores_grad_fn(fn, k, "ffi"), scores_grad_fn(fn, k, "ref")
            flat = [v for x, r in zip(xs, rs) for v in (x, r)]
            t = time_call(many(gf, 2), flat, args.reps, budget) / sets
            tr = time_call(many(gr, 2), flat, max(3, args.reps // 3), budget) / sets
            floor = (2 * T * E * b + T * E * 4) / bw  # logits + cotangent in, grad out
            print(row(f"scores f+b   {fn:<12} {dname}", 1e6 * t, 1e6 * floor, 1e6 * tr))
    probs = [jax.nn.softmax(r, axis=-1) for r in rs]
    tpe = jnp.arange(E, dtype=jnp.int32) * 3 + 1
    lf = loss_fn(T, E, k)
    flat = [v for pr in probs for v in (pr, tpe)]
    t = time_call(many(lf, 2), flat, args.reps, budget) / len(probs)
    print(row("aux loss fwd  (f32 probs)", 1e6 * t, 1e6 * T * E * 4 / bw))
    lg = jax.grad(lf)
    t = time_call(many(lg, 2), flat, args.reps, budget) / len(probs)
    print(row("aux loss f+b  (f32 probs)", 1e6 * t, 1e6 * 2 * T * E * 4 / bw))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
