"""Quantile-balancing benchmark: the fused QB router against the jitted pure-JAX reference and
against the plain router on the same config (896 experts, top-16, sigmoid + bias: Kimi-K3).

Rows per token count (bf16 logits, num_bins=1000 as in TransformerEngine's tests):
- ``qb fused``: ``route_topk_qb`` (kernels): routing, cutoff and histogram in one kernel;
- ``qb reference``: ``jax_router.reference.route_topk_qb`` under ``jax.jit`` (what a JAX user
  would write: top-k of topk + 1, a bin per expert, a scatter-add into the histogram);
- ``plain router``: ``route_topk`` with the same options, no cutoff or histogram;
- ``... fwd+bwd``: ``jax.grad`` of ``sum(weights * r)``.

Method as benchmarks/bench_gpu.py: S input sets (enough logits to exceed the 50 MB L2) in one
jitted call, median of back-to-back calls, divided by S; the byte floor is the logits read
once plus ``[T, k]`` weights and int32 indices, ``[T]`` cutoff written, over the copy bandwidth
measured in the same run (the histogram's counts are atomics into a 3.6 MB table, not counted).

    python3 benchmarks/bench_qb.py                    # T = 16384 and 65536
    python3 benchmarks/bench_qb.py --tokens 1024 --quick   # smoke run (CPU too)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gpu import L2_BYTES, copy_bandwidth, many, time_call  # noqa: E402

import jax_router as jr  # noqa: E402

E, K, BINS = 896, 16, 1000
BOUNDS = jnp.array([-1.0, 1.0], jnp.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="16384,65536")
    ap.add_argument("--quick", action="store_true", help="few repetitions")
    args = ap.parse_args()
    reps, budget = (5, 1.0) if args.quick else (30, 6.0)
    dev = jax.devices()[0]
    print(f"# {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; E={E}, "
          f"topk={K}, num_bins={BINS}, bf16 logits")
    bw = copy_bandwidth()
    print(f"# copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    bias = 0.1 * jax.random.normal(jax.random.key(1), (E,), jnp.float32)

    def qb(x):
        return jr.route_topk_qb(x, K, bias, BOUNDS, BINS, implementation="ffi")

    def qb_ref(x):
        return jr.reference.route_topk_qb(x, K, bias, BOUNDS, BINS)

    def plain(x):
        return jr.route_topk(x, K, score_function="sigmoid", expert_bias=bias,
                             implementation="ffi")

    def grad(f):
        return lambda x, r: jax.grad(lambda x: jnp.sum(f(x)[0] * r))(x)

    print("| tokens | op | µs | floor µs | x floor | vs qb fused |")
    print("|---:|---|---:|---:|---:|---:|")
    for T in [int(t) for t in args.tokens.split(",")]:
        sets = int(min(16, max(2, math.ceil(2 * L2_BYTES / (T * E * 2)))))
        xs = [jax.random.normal(jax.random.key(s), (T, E), jnp.float32).astype(jnp.bfloat16)
              for s in range(sets)]
        r = jax.random.normal(jax.random.key(9), (T, K), jnp.float32)
        # one correctness check per size: same selection as the plain router, counts exact
        w, idx, cutoff, hist = jax.jit(qb)(xs[0])
        pw, pidx = jax.jit(plain)(xs[0])
        ok = bool((idx == pidx).all()) and bool((hist.sum(axis=1) == T).all())
        floor = (T * E * 2 + T * K * 8 + T * 4) / bw
        times = {}
        for name, f in (("qb fused", qb), ("qb reference", qb_ref), ("plain router", plain)):
            times[name] = time_call(many(f, 1), xs, reps, budget) / sets
        for name, f in (("qb fused fwd+bwd", qb), ("qb reference fwd+bwd", qb_ref),
                        ("plain router fwd+bwd", plain)):
            flat = [v for x in xs for v in (x, r)]
            times[name] = time_call(many(grad(f), 2), flat, reps, budget) / sets
        for name, t in times.items():
            base = times["qb fused fwd+bwd" if "bwd" in name else "qb fused"]
            fl = f"{1e6 * floor:.1f}" if "bwd" not in name else "-"
            xf = f"{t / floor:.2f}" if "bwd" not in name else "-"
            print(f"| {T} | {name} | {1e6 * t:.1f} | {fl} | {xf} | {t / base:.2f}x |")
        print(f"# T={T}: {'selection equals the plain router, counts exact' if ok else 'MISMATCH'}")
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
