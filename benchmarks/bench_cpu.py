"""CPU benchmark: the fused FFI router against the jitted pure-JAX reference.

For each workload (benchmarks/workloads.py) and each output mode it times, under ``jax.jit``:

- fwd:      the routing call alone;
- fwd+bwd:  ``jax.grad`` of ``sum(values * r)`` w.r.t. the logits (``r`` a fixed random array
            of the values' shape, so the gradient is not trivially zero);

for the fused path (``implementation="ffi"``) and for ``jax_router.reference`` with the same
arguments, and prints the median times and their ratio. Modes:

- compact:  ``route_topk`` -> (weights f32 [T, k], indices int32 [T, k]);
- dense:    ``fused_topk_with_score_function(..., topk_indices_dtype=jnp.int32)``
            -> (probs [T, E], indices int32 [T, k]);
- map:      ``fused_topk_with_score_function(...)`` -> (probs [T, E], bool map [T, E]).

Every fused output (and its gradient) is checked against the reference once before timing.

    .venv/bin/python benchmarks/bench_cpu.py                 # default table (a few minutes)
    .venv/bin/python benchmarks/bench_cpu.py --quick         # smoke run (well under a minute)
    .venv/bin/python benchmarks/bench_cpu.py --configs deepseek-v3 --tokens 4096 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


from workloads import WORKLOADS, Workload, get, grad_fn, make_inputs, route_fn, verify_route

# Default rows: the headline workload at a realistic per-device token count, the others smaller.
DEFAULT_TOKENS = {"deepseek-v3": 16384}
DEFAULT_OTHER_TOKENS = 4096
QUICK_TOKENS = 1024
MODES = ("compact", "dense", "map")
TARGET = ("deepseek-v3", 16384, 10.0)  # fused fwd at least 10x the reference's speed
DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32,
          "f32": jnp.float32, "float16": jnp.float16, "f16": jnp.float16}


def paired_median_times(f: Callable, g: Callable, args: tuple, repeats: int,
                        budget_s: float) -> tuple[float, float]:
    """Median wall times (s) of ``f(*args)`` and ``g(*args)``, both compiled and warmed up first.

    The calls alternate f, g, f, g, ... so that both see the same machine load (the ratio stays
    meaningful on a shared or throttled CPU). At least ``repeats`` pairs; more while the whole
    loop is under 0.2 s; stops early once three pairs have run and ``budget_s`` is spent.
    """
    jax.block_until_ready(f(*args))
    jax.block_until_ready(g(*args))
    tf: list[float] = []
    tg: list[float] = []
    start = time.perf_counter()
    while len(tf) < repeats or (len(tf) < 3 * repeats and time.perf_counter() - start < 0.2):
        for fn, times in ((f, tf), (g, tg)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        if len(tf) >= 3 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(tf), statistics.median(tg)


def check_grad(g: np.ndarray, g_ref: np.ndarray, rows_ok: np.ndarray, dtype) -> str | None:
    g = np.asarray(g, np.float32)[rows_ok]
    g_ref = np.asarray(g_ref, np.float32)[rows_ok]
    rtol = {np.dtype(np.float32): 1e-4, np.dtype(jnp.bfloat16): 2e-2,
            np.dtype(np.float16): 4e-3}[np.dtype(dtype)]
    atol = rtol * max(float(np.abs(g_ref).max(initial=0.0)), 1e-30)
    if not np.allclose(g, g_ref, rtol=rtol, atol=atol):
        return f"gradient differs: max abs error {float(np.abs(g - g_ref).max()):.3g} (atol {atol:.3g})"
    return None


def bench_one(cfg: Workload, tokens: int, dtype, mode: str, repeats: int, budget_s: float,
              do_bwd: bool) -> dict[str, Any]:
    logits, bias = make_inputs(cfg, tokens, dtype, seed=0)
    fused, ref = route_fn(cfg, mode, True), route_fn(cfg, mode, False)
    f_fwd, r_fwd = jax.jit(fused), jax.jit(ref)

    out, ref_out = f_fwd(logits, bias), r_fwd(logits, bias)
    problems = verify_route(cfg, logits, bias, out, ref_out)
    row = dict(config=cfg.name, tokens=tokens, dtype=jnp.dtype(dtype).name, mode=mode,
               problems=problems)

    tf, tr = paired_median_times(f_fwd, r_fwd, (logits, bias), repeats, budget_s)
    row["fwd_fused_ms"], row["fwd_ref_ms"] = 1e3 * tf, 1e3 * tr
    if do_bwd:
        r = jax.random.normal(jax.random.key(7), out[0].shape, jnp.float32)
        f_bwd, r_bwd = jax.jit(grad_fn(fused)), jax.jit(grad_fn(ref))
        # Rows whose routing is a near-tie flip (allowed by verify_route) have other gradients.
        same = np.asarray(out[1] == ref_out[1]).reshape(tokens, -1).all(-1)
        err = check_grad(f_bwd(logits, bias, r), r_bwd(logits, bias, r), same, dtype)
        if err:
            problems.append(err)
        tf, tr = paired_median_times(f_bwd, r_bwd, (logits, bias, r), repeats, budget_s)
        row["bwd_fused_ms"], row["bwd_ref_ms"] = 1e3 * tf, 1e3 * tr
    return row


def fmt_row(row: dict[str, Any]) -> str:
    def t(key):
        return f"{row[key]:9.3f}" if key in row else f"{'-':>9}"

    def ratio(a, b):
        return f"{row[b] / row[a]:7.1f}x" if a in row and b in row else f"{'-':>8}"

    status = "ok" if not row["problems"] else "MISMATCH"
    return (f"{row['config']:<12} {row['tokens']:>7} {row['dtype']:<9} {row['mode']:<8}"
            f" {t('fwd_fused_ms')} {t('fwd_ref_ms')} {ratio('fwd_fused_ms', 'fwd_ref_ms')}"
            f" {t('bwd_fused_ms')} {t('bwd_ref_ms')} {ratio('bwd_fused_ms', 'bwd_ref_ms')}"
            f"  {status}")


HEADER = (f"{'config':<12} {'tokens':>7} {'dtype':<9} {'mode':<8}"
          f" {'fwd fused':>9} {'fwd ref':>9} {'speedup':>8}"
          f" {'f+b fused':>9} {'f+b ref':>9} {'speedup':>8}  check")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(WORKLOADS),
                   help=f"comma-separated workloads (default: all of {', '.join(WORKLOADS)})")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"tokens per call for every config (default: deepseek-v3 "
                        f"{DEFAULT_TOKENS['deepseek-v3']}, others {DEFAULT_OTHER_TOKENS})")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="logits dtype")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of "
                   + ", ".join(MODES))
    p.add_argument("--repeats", type=int, default=None,
                   help="timed (fused, reference) call pairs per measurement")
    p.add_argument("--no-bwd", action="store_true", help="skip the fwd+bwd columns")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_TOKENS} tokens, few repeats")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)

    configs = [get(c) for c in args.configs.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (3 if args.quick else 7)
    budget_s = 2.0 if args.quick else 10.0

    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind} "
          f"({len(jax.devices())} device(s)); times are medians in ms")
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    for cfg in configs:
        tokens = args.tokens or (QUICK_TOKENS if args.quick
                                 else DEFAULT_TOKENS.get(cfg.name, DEFAULT_OTHER_TOKENS))
        for mode in modes:
            row = bench_one(cfg, tokens, dtype, mode, repeats, budget_s, not args.no_bwd)
            rows.append(row)
            print(fmt_row(row), flush=True)
            for prob in row["problems"]:
                print(f"    {cfg.name}/{mode}: {prob}")

    name, t_target, factor = TARGET
    for row in rows:
        if (row["config"], row["tokens"]) == (name, t_target):
            s = row["fwd_ref_ms"] / row["fwd_fused_ms"]
            print(f"target {name} @ {t_target} tokens, {row['mode']} fwd >= {factor:g}x the "
                  f"reference: {s:.1f}x {'met' if s >= factor else 'NOT MET'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=str(dev), backend=jax.default_backend(), rows=rows), fh,
                      indent=1)
    failed = [r for r in rows if r["problems"]]
    print(f"{len(rows)} rows, {len(failed)} mismatched against the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
