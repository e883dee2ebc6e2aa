"""Dispatch benchmark: the plan, permute and unpermute kernels against the pure-JAX path.

Times under ``jax.jit``, for the kernels (``implementation="ffi"``) and for
``jax_router.reference`` (``implementation="xla"``: a stable argsort of the flat ids plus a
bincount for the plan, an XLA ``take`` gather for permute, a gather-and-add per slot for
unpermute):

- plan:      ``dispatch_plan`` of ``[T, k]`` int32 ids (default T = 16384 and 65536, k = 8,
             E = 256, uniform random ids);
- permute:   ``x [T, H] -> rows [T*k, H]`` (default H = 7168, bfloat16);
- unpermute: ``rows [T*k, H] -> out [T, H]`` with float32 weights.

Method (as benchmarks/bench_gpu.py): one jitted function runs the op on S input sets (S >= 4,
together larger than the 50 MB L2), every output returned; its wall time (median of many
back-to-back calls) over S is the time per call. For the row ops the table also gives the
bandwidth achieved, counting each row the op reads and writes once (permute: ``2 * T*k``
rows of ``H``, each buffer row gathered and written; unpermute: ``T*k + T`` rows, the buffer
read and the output written), as a percentage of the copy bandwidth measured in the same run, and the byte floor:
the bytes that must move at least (permute: x read once, rows written; unpermute: rows read,
out written; plus the plan's indices) over that copy bandwidth.

    python3 benchmarks/bench_dispatch.py                  # default table (GPU)
    python3 benchmarks/bench_dispatch.py --quick          # small sizes, runs on CPU too
    python3 benchmarks/bench_dispatch.py --out DIR --plot # also DIR/bench_dispatch.json, .png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax_router as jr  # noqa: E402
from bench_gpu import L2_BYTES, copy_bandwidth, many, pyplot, time_call  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}


def _sets(set_bytes: int) -> int:
    return int(min(16, max(4, math.ceil(2 * L2_BYTES / max(set_bytes, 1)))))


def _ids(T: int, k: int, E: int, seed: int) -> np.ndarray:
    """k distinct experts per token, uniformly at random (as a top-k router gives)."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)


def _time(fn, per_set: list[tuple], reps: int, budget_s: float) -> float:
    nargs = len(per_set[0])
    flat = [a for s in per_set for a in s]
    return time_call(many(fn, nargs), flat, reps, budget_s) / len(per_set)


def bench_plan(T: int, k: int, E: int, reps: int, budget_s: float) -> dict[str, Any]:
    sets = _sets(T * k * 4 * 4)  # ids read, positions and source written (and the workspace)
    ids = [jnp.asarray(_ids(T, k, E, s)) for s in range(sets)]
    row: dict[str, Any] = dict(op="plan", tokens=T, topk=k, experts=E, hidden=None,
                               dtype="int32", sets=sets, problems=[])
    f = {m: (lambda i, m=m: jr.dispatch_plan(i, E, implementation=m)) for m in ("ffi", "xla")}
    a, b = jax.jit(f["ffi"])(ids[0]), jax.jit(f["xla"])(ids[0])
    for name, u, v in zip(("tokens_per_expert", "positions", "source"), jax.tree.leaves(a),
                          jax.tree.leaves(b)):
        if not np.array_equal(np.asarray(u), np.asarray(v)):
            row["problems"].append(f"plan {name} differs from the reference")
    row["ffi_us"] = 1e6 * _time(f["ffi"], [(i,) for i in ids], reps, budget_s)
    row["xla_us"] = 1e6 * _time(f["xla"], [(i,) for i in ids], max(3, reps // 3), budget_s)
    return row


def bench_rows(op: str, T: int, k: int, E: int, H: int, dtype, bw: float, reps: int,
               budget_s: float) -> dict[str, Any]:
    b = jnp.dtype(dtype).itemsize
    R = T * k
    sets = _sets(R * H * b)
    rng = np.random.default_rng(0)
    per_set = []
    for s in range(sets):
        plan = jax.jit(lambda i: jr.dispatch_plan(i, E))(jnp.asarray(_ids(T, k, E, s)))
        if op == "permute":
            x = jnp.asarray(rng.standard_normal((T, H), np.float32), dtype)
            per_set.append((x, plan))
        else:
            rows = jax.random.normal(jax.random.key(s), (R, H), dtype)
            w = jnp.asarray(rng.random((T, k), np.float32))
            per_set.append((rows, plan, w))
    row: dict[str, Any] = dict(op=op, tokens=T, topk=k, experts=E, hidden=H,
                               dtype=jnp.dtype(dtype).name, sets=sets, problems=[])
    if op == "permute":
        f = {m: (lambda x, p, m=m: jr.permute(x, p, implementation=m)) for m in ("ffi", "xla")}
        floor = T * H * b + R * H * b + R * 4
        moved = 2 * R * H * b  # every buffer row gathered from x and written
    else:
        f = {m: (lambda r, p, w, m=m: jr.unpermute(r, p, w, implementation=m))
             for m in ("ffi", "xla")}
        floor = R * H * b + T * H * b + T * k * 8
        moved = (R + T) * H * b  # every buffer row read, every output row written
    u, v = jax.jit(f["ffi"])(*per_set[0]), jax.jit(f["xla"])(*per_set[0])
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    if op == "permute" and not np.array_equal(u, v):
        row["problems"].append("permute differs from the reference")
    if op == "unpermute" and not np.allclose(u, v, rtol=2e-2, atol=2e-2):
        row["problems"].append("unpermute differs from the reference beyond rounding")
    t = _time(f["ffi"], per_set, reps, budget_s)
    row["ffi_us"] = 1e6 * t
    row["xla_us"] = 1e6 * _time(f["xla"], per_set, max(3, reps // 3), budget_s)
    row["floor_us"] = 1e6 * floor / bw
    row["eff_tbps"] = moved / t / 1e12
    row["pct_copy"] = 100 * moved / t / bw
    return row


HEADER = ("| op | tokens | k | E | H | dtype | kernel us | xla us | speedup | floor us "
          "| TB/s | % copy bw |")


def fmt(r: dict[str, Any]) -> str:
    def v(key, p=1):
        x = r.get(key)
        return "-" if x is None else f"{x:.{p}f}"

    return (f"| {r['op']} | {r['tokens']} | {r['topk']} | {r['experts']} | {r['hidden'] or '-'} "
            f"| {r['dtype']} | {v('ffi_us')} | {v('xla_us')} | "
            f"{r['xla_us'] / r['ffi_us']:.1f}x | {v('floor_us')} | {v('eff_tbps', 2)} | "
            f"{v('pct_copy', 0)} |")


def plot(rows: list[dict[str, Any]], path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['op']}\nT={r['tokens']}" for r in rows]
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["ffi_us"] for r in rows], 0.4, label="kernels")
    ax.bar(xs + 0.2, [r["xla_us"] for r in rows], 0.4, label="pure JAX (xla)")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("us per call")
    ax.set_title("jax_router dispatch: kernels vs pure JAX")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan-tokens", default="16384,65536")
    p.add_argument("--row-tokens", default="4096,16384")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, CPU too)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", help="directory for bench_dispatch.json (and the --plot PNG)")
    p.add_argument("--plot", action="store_true", help="write bench_dispatch.png (matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        plan_tokens, row_tokens, H = [1024], [256], 256
    else:
        plan_tokens = [int(t) for t in args.plan_tokens.split(",")]
        row_tokens = [int(t) for t in args.row_tokens.split(",")]
        H = args.hidden
    k, E, dtype = args.topk, args.experts, DTYPES[args.dtype]
    reps = args.reps or (5 if args.quick else 15)
    budget_s = 1.0 if args.quick else 3.0

    dev = jax.devices()[0]
    bw = copy_bandwidth(64 << 20 if args.quick else 1 << 30)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s (jitted copy, read + write)\n")
    print("times: us per call (median over S input sets in one jitted call); TB/s and % copy "
          "bw: rows read + written (permute 2*T*k, unpermute T*k + T) / time; floor: bytes "
          "that must move / copy bw\n")
    print(HEADER)
    print("|---" * (HEADER.count("|") - 1) + "|")
    rows = []
    for T in plan_tokens:
        rows.append(bench_plan(T, k, E, reps, budget_s))
        print(fmt(rows[-1]), flush=True)
    for op in ("permute", "unpermute"):
        for T in row_tokens:
            rows.append(bench_rows(op, T, k, E, H, dtype, bw, reps, budget_s))
            print(fmt(rows[-1]), flush=True)
    for r in rows:
        for prob in r["problems"]:
            print(f"PROBLEM {r['op']} T={r['tokens']}: {prob}")
    out_dir = args.out or "."
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_dispatch.json"), "w") as fh:
            json.dump(dict(device=str(dev.device_kind), copy_bw=bw, rows=rows), fh, indent=1)
    if args.plot and plot(rows, os.path.join(out_dir, "bench_dispatch.png")):
        print(f"wrote {os.path.join(out_dir, 'bench_dispatch.png')}")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
