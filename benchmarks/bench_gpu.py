"""GPU benchmark: the fused CUDA router against the jitted pure-JAX reference, one table.

For each workload (benchmarks/workloads.py), token count, logits dtype and output mode it
times under ``jax.jit``:

- fwd:      the routing call alone;
- fwd+bwd:  ``jax.grad`` of ``sum(values * r)`` w.r.t. the logits;

for the fused path (``implementation="ffi"``) and for ``jax_router.reference`` with the same
arguments. Modes: ``compact`` (``route_topk`` -> weights f32 + int32 indices), ``dense``
(``fused_topk_with_score_function(..., topk_indices_dtype=jnp.int32)`` -> probs + indices) and
``map`` (probs + bool routing map).

Method: one jitted function runs the call on S different input sets (S >= 4, enough sets that
their logits exceed the 50 MB L2), all outputs returned so nothing is dead code; its wall time
(``block_until_ready``, median of many repetitions) divided by S is the time per call. The byte
floor is the bytes a call must move (inputs read once, outputs written once; see ``floor_bytes``)
over the copy bandwidth measured in the same run (a jitted 1 GiB copy, bytes read + written).

    python3 benchmarks/bench_gpu.py                   # default table (~5 min on an H100)
    python3 benchmarks/bench_gpu.py --quick           # smoke run
    python3 benchmarks/bench_gpu.py --configs deepseek-v3 --tokens 16384,65536 --modes compact
    python3 benchmarks/bench_gpu.py --out DIR         # also DIR/bench_gpu.json and a PNG
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import (  # noqa: E402
    WORKLOADS, Workload, get, grad_fn, make_inputs, route_fn, verify_route)

MODES = ("compact", "dense", "map")
DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f32": jnp.float32,
          "float32": jnp.float32, "f16": jnp.float16, "float16": jnp.float16}
L2_BYTES = 50 << 20


def floor_bytes(cfg: Workload, T: int, b: int, mode: str, bwd: bool) -> float:
    """Bytes a call must move at least (each input read once, each output written once)."""
    E, k = cfg.E, cfg.topk
    x = T * E * b
    if mode == "compact":
        fwd = x + T * k * 8  # weights f32 + indices int32
        if not bwd:
            return fwd
        # + act residual written and read, cotangent [T, k] read, grad_logits written
        return fwd + T * k * 4 * 2 + T * k * 4 + x
    out_map = T * k * 4 if mode == "dense" else T * E
    fwd = x + x + out_map  # logits, probs, indices / bool map
    if not bwd:
        return fwd
    # + residuals (indices + act) written and read, dense cotangent [T, E] written and read
    # (XLA materialises it), grad_logits written
    return fwd + T * k * 8 * 2 + 2 * x + x


def many(f: Callable, nargs: int) -> Callable:
    """jit(f over S argument tuples, returning every output)."""

    def g(*flat):
        return [f(*flat[i:i + nargs]) for i in range(0, len(flat), nargs)]

    return jax.jit(g)


def time_call(fn: Callable, args: list, reps: int, budget_s: float) -> float:
    """Median time (s) of one fn(*args), measured over back-to-back asynchronous calls.

    Each repetition dispatches ``inner`` calls and blocks on the last, so the host's dispatch
    and synchronisation cost (hundreds of us on a VM) is spread over enough GPU work (>= ~3 ms)
    to vanish; ``inner`` is sized from a first, blocking call.
    """
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    inner = int(min(200, max(1, 3e-3 / max(one, 1e-6))))
    for _ in range(2):  # warm up the asynchronous path
        outs = [fn(*args) for _ in range(inner)]
        jax.block_until_ready(outs[-1])
    ts: list[float] = []
    start = time.perf_counter()
    while len(ts) < reps:
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / inner)
        del out
        if len(ts) >= 5 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(ts)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a jitted elementwise copy of ``nbytes`` (1 GiB)."""
    n = nbytes // 4
    a = jnp.arange(n, dtype=jnp.float32)
    f = jax.jit(lambda v: v * 2.0)
    t = time_call(f, [a], 20, 5.0)
    del a
    return 2.0 * n * 4 / t


def bench_one(cfg: Workload, T: int, dtype, mode: str, bw: float, reps: int, budget_s: float,
              do_bwd: bool, do_ref: bool) -> dict[str, Any]:
    b = jnp.dtype(dtype).itemsize
    set_bytes = T * cfg.E * b
    sets = int(min(16, max(4, math.ceil(2 * L2_BYTES / set_bytes))))
    inputs = [make_inputs(cfg, T, dtype, seed=s) for s in range(sets)]
    bias = inputs[0][1]
    fused, ref = route_fn(cfg, mode, True), route_fn(cfg, mode, False)
    row: dict[str, Any] = dict(config=cfg.name, tokens=T, dtype=jnp.dtype(dtype).name,
                               mode=mode, sets=sets, problems=[])

    # Check once against the reference.
    x0 = inputs[0][0]
    out, ref_out = jax.jit(fused)(x0, bias), jax.jit(ref)(x0, bias)
    row["problems"] += verify_route(cfg, x0, bias, out, ref_out)

    flat = [v for x, _ in inputs for v in (x, bias)]
    t = time_call(many(fused, 2), flat, reps, budget_s) / sets
    row["fwd_us"] = 1e6 * t
    row["fwd_floor_us"] = 1e6 * floor_bytes(cfg, T, b, mode, False) / bw
    if do_ref:
        row["fwd_ref_us"] = 1e6 * time_call(many(ref, 2), flat, max(3, reps // 3), budget_s) / sets
    if do_bwd:
        r = jax.random.normal(jax.random.key(7), out[0].shape, jnp.float32)
        flat_b = [v for x, _ in inputs for v in (x, bias, r)]
        gf, gr = grad_fn(fused), grad_fn(ref)
        t = time_call(many(gf, 3), flat_b, reps, budget_s) / sets
        row["bwd_us"] = 1e6 * t
        row["bwd_floor_us"] = 1e6 * floor_bytes(cfg, T, b, mode, True) / bw
        if do_ref:
            row["bwd_ref_us"] = 1e6 * time_call(many(gr, 3), flat_b, max(3, reps // 3),
                                                budget_s) / sets
    return row


def fmt(row: dict[str, Any]) -> str:
    def v(key, w=8, p=1):
        return f"{row[key]:{w}.{p}f}" if key in row else f"{'-':>{w}}"

    def ratio(a, b, w=6):
        return f"{row[a] / row[b]:{w}.2f}" if a in row and b in row else f"{'-':>{w}}"

    status = "ok" if not row["problems"] else "MISMATCH"
    dt = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(row["dtype"], row["dtype"])
    return (f"{row['config']:<11} {row['tokens']:>7} {dt:<4} {row['mode']:<7}"
            f" {v('fwd_us')} {v('fwd_floor_us')} {ratio('fwd_us', 'fwd_floor_us')}"
            f" {v('fwd_ref_us', 9)} {ratio('fwd_ref_us', 'fwd_us', 7)}"
            f" | {v('bwd_us')} {v('bwd_floor_us')} {ratio('bwd_us', 'bwd_floor_us')}"
            f" {v('bwd_ref_us', 9)} {ratio('bwd_ref_us', 'bwd_us', 7)}  {status}")


HEADER = (f"{'config':<11} {'tokens':>7} {'dt':<4} {'mode':<7}"
          f" {'fwd us':>8} {'floor':>8} {'x flr':>6} {'ref us':>9} {'speedup':>7}"
          f" | {'f+b us':>8} {'floor':>8} {'x flr':>6} {'ref us':>9} {'speedup':>7}  check")


def default_plan(quick: bool) -> list[tuple[str, int, str, str]]:
    """(config, tokens, dtype, mode) rows of the default table."""
    if quick:
        return [(c, 4096, "bf16", "compact") for c in WORKLOADS] + [
            ("deepseek-v3", 4096, "bf16", "dense"), ("deepseek-v3", 4096, "bf16", "map")]
    plan = []
    for c in WORKLOADS:
        for T in (16384, 65536):
            plan.append((c, T, "bf16", "compact"))
    for T in (1024, 4096, 262144):
        plan.append(("deepseek-v3", T, "bf16", "compact"))
    for T in (16384, 65536):
        plan.append(("deepseek-v3", T, "f32", "compact"))
        plan.append(("deepseek-v3", T, "bf16", "dense"))
        plan.append(("deepseek-v3", T, "bf16", "map"))
        plan.append(("qwen3", T, "f32", "compact"))
    plan.append(("qwen3", 65536, "bf16", "dense"))
    plan.append(("mixtral", 65536, "bf16", "dense"))
    return plan


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - the plot is optional
        return None
    return plt


def plot(rows: list[dict[str, Any]], bw: float, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cfg in WORKLOADS:
        pts = sorted((r["tokens"], r["fwd_floor_us"] / r["fwd_us"] * bw / 1e12)
                     for r in rows if r["config"] == cfg and r["mode"] == "compact"
                     and r["dtype"] == "bfloat16")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=cfg)
    ax.axhline(bw / 1e12, color="gray", ls="--", label="device copy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("achieved TB/s (compact forward, bf16)")
    ax.set_title("jax_router CUDA forward: bytes that must move / time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", help="comma-separated workloads (with --tokens etc.: a grid)")
    p.add_argument("--tokens", help="comma-separated token counts")
    p.add_argument("--dtypes", default="bf16", help="comma-separated logits dtypes")
    p.add_argument("--modes", default="compact", help="comma-separated subset of "
                   + ", ".join(MODES))
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--no-bwd", action="store_true", help="skip fwd+bwd")
    p.add_argument("--no-ref", action="store_true", help="skip the reference timings")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", help="directory for bench_gpu.json and bench_gpu.png")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting new rows after this much wall time")
    args = p.parse_args(argv)

    if args.configs or args.tokens:
        configs = (args.configs or ",".join(WORKLOADS)).split(",")
        tokens = [int(t) for t in (args.tokens or "16384,65536").split(",")]
        plan = [(c, T, d, m) for c in configs for T in tokens
                for d in args.dtypes.split(",") for m in args.modes.split(",")]
    else:
        plan = default_plan(args.quick)
    reps = args.reps or (5 if args.quick else 15)
    budget_s = 1.0 if args.quick else 3.0

    dev = jax.devices()[0]
    bw = copy_bandwidth()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (jitted 1 GiB copy, read + write)")
    print("times: us per call (median); floor: bytes that must move / copy bandwidth; "
          "speedup: reference time / fused time")
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    t_start = time.perf_counter()
    for c, T, d, m in plan:
        if args.max_minutes and time.perf_counter() - t_start > 60 * args.max_minutes:
            print(f"(stopped after {args.max_minutes:g} min; {len(plan) - len(rows)} rows not run)")
            break
        cfg = get(c)
        row = bench_one(cfg, T, DTYPES[d], m, bw, reps, budget_s, not args.no_bwd,
                        not args.no_ref)
        rows.append(row)
        print(fmt(row), flush=True)
        for prob in row["problems"]:
            print(f"    {c}/{m}: {prob}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as fh:
            json.dump(dict(device=str(dev.device_kind), copy_bw=bw, rows=rows), fh, indent=1)
        if plot(rows, bw, os.path.join(args.out, "bench_gpu.png")):
            print(f"wrote {os.path.join(args.out, 'bench_gpu.png')}")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
