"""jax_router demo (``make demo``): route real model configurations and check them.

On the default JAX backend (CPU here, a GPU when one is present) it routes a few thousand bf16
tokens for DeepSeek-V3, Qwen3, Mixtral and Kimi-K2 with the fused router, in two output modes:

- compact: ``route_topk`` -> (weights f32 [T, k], indices int32 [T, k]), what an
  expert-parallel dispatcher consumes;
- dense:   ``fused_topk_with_score_function(..., topk_indices_dtype=jnp.int32)`` ->
  (probs [T, E], indices int32 [T, k]), TransformerEngine's signature with dense indices;

checks each result against the pure-JAX reference (``jax_router.reference``: indices equal,
weights within tolerance) and the gradient of one, times both under ``jax.jit``, and prints a
table. Exits non-zero if any check fails.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_router as jr
from jax_router import _ffi, reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from workloads import get, make_inputs, verify_route  # noqa: E402

CONFIGS = ("deepseek-v3", "qwen3", "mixtral", "kimi-k2")
TOKENS = 4096
REPEATS = 5


def paired_median_ms(f, g, *args) -> tuple[float, float]:
    """Median ms of f(*args) and g(*args), calls alternating so both see the same load."""
    for fn in (f, g):
        jax.block_until_ready(fn(*args))  # compile and warm up
    times = ([], [])
    start = time.perf_counter()
    # REPEATS pairs (3 once 2 s are spent), more (up to 10x) while under 0.3 s: cheap calls
    # are noisy, and the whole demo should stay well under a minute on a small CPU.
    while True:
        n, spent = len(times[0]), time.perf_counter() - start
        if n >= 10 * REPEATS or (n >= REPEATS and spent >= 0.3) or (n >= 3 and spent >= 2.0):
            break
        for fn, ts in zip((f, g), times):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
    return tuple(1e3 * statistics.median(ts) for ts in times)


def routers(cfg, mode):
    """(fused, reference) functions ``f(logits, bias) -> (values, indices)`` for one mode."""
    k, opts = cfg.topk, cfg.options
    if mode == "compact":
        return (lambda x, b: jr.route_topk(x, k, expert_bias=b, **opts),
                lambda x, b: reference.route_topk(x, k, expert_bias=b, **opts))
    return (lambda x, b: jr.fused_topk_with_score_function(
                x, k, expert_bias=b, topk_indices_dtype=jnp.int32, **opts),
            lambda x, b: reference.fused_topk_with_score_function(
                x, k, expert_bias=b, topk_indices_dtype=jnp.int32, **opts))


def main() -> int:
    dev = jax.devices()[0]
    fused_path = "FFI kernels" if _ffi.default_backend_has_kernels() else "pure-JAX fallback"
    print(f"jax_router {jr.__version__} on jax {jax.__version__}")
    print(f"backend: {jax.default_backend()}, device: {dev.device_kind} ({dev}), "
          f"fused path: {fused_path}")
    print(f"{TOKENS} tokens of bfloat16 logits per call; times are medians of 3 or more "
          f"jitted calls\n")

    # One routing decision up close: DeepSeek-V3 (sigmoid + bias, 8 groups keep 4, scale 2.5).
    ds = get("deepseek-v3")
    logits, bias = make_inputs(ds, 2, jnp.bfloat16, seed=1)
    w, idx = jax.jit(lambda x, b: jr.route_topk(x, ds.topk, expert_bias=b, **ds.options))(
        logits, bias)
    print(f"DeepSeek-V3 token 0 -> experts {np.asarray(idx[0]).tolist()}")
    weights = ", ".join(f"{v:.4f}" for v in np.asarray(w[0]))
    print(f"            with weights [{weights}] (sum {float(w[0].sum()):.4f} = scaling_factor)\n")

    header = (f"{'config':<12} {'router':<48} {'mode':<8} {'fused ms':>9} "
              f"{'ref ms':>9} {'speedup':>8}  check")
    print(header)
    print("-" * len(header))
    failures = 0
    for name in CONFIGS:
        cfg = get(name)
        logits, bias = make_inputs(cfg, TOKENS, jnp.bfloat16, seed=0)
        for mode in ("compact", "dense"):
            fused, ref = (jax.jit(f) for f in routers(cfg, mode))
            problems = verify_route(cfg, logits, bias, fused(logits, bias), ref(logits, bias))
            t_fused, t_ref = paired_median_ms(fused, ref, logits, bias)
            failures += bool(problems)
            print(f"{cfg.name:<12} {cfg.describe():<48} {mode:<8} {t_fused:9.2f} {t_ref:9.2f} "
                  f"{t_ref / t_fused:7.1f}x  {'ok' if not problems else 'MISMATCH'}", flush=True)
            for p in problems:
                print(f"    {p}")

    # The backward: gradient of a weighted sum of the compact weights, fused vs reference.
    logits, bias = make_inputs(ds, 512, jnp.float32, seed=2)
    r = jax.random.normal(jax.random.key(3), (512, ds.topk))
    grads = []
    for route in (jr.route_topk, reference.route_topk):
        loss = lambda x, b, f=route: jnp.sum(f(x, ds.topk, expert_bias=b, **ds.options)[0] * r)
        grads.append(np.asarray(jax.jit(jax.grad(loss))(logits, bias)))
    grad_ok = np.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    failures += not grad_ok
    print(f"\ngrad w.r.t. logits (deepseek-v3, 512 tokens, float32) matches the reference: "
          f"{'yes' if grad_ok else 'NO'} (max abs diff {np.abs(grads[0] - grads[1]).max():.2e})")

    if failures:
        print(f"FAILED: {failures} check(s) disagree with the reference")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
