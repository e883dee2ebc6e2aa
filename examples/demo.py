"""jax_router demo (``make demo``): route real model configurations, check them, plot the times.

On the default JAX backend (CPU here, a GPU when one is present) it routes bf16 logits for
DeepSeek-V3, Qwen3, Qwen3-Next, Mixtral and Kimi-K2 with the fused router, in three modes:

- compact: ``route_topk`` -> (weights f32 [T, k], indices int32 [T, k]), what an
  expert-parallel dispatcher consumes;
- dense:   ``fused_topk_with_score_function(..., topk_indices_dtype=jnp.int32)`` ->
  (probs [T, E], indices int32 [T, k]), TransformerEngine's signature with dense indices;
- grad:    ``jax.grad`` of ``sum(weights * r)`` through ``route_topk`` (forward + backward);

checks every result against the pure-JAX reference (``jax_router.reference``: indices equal,
weights and gradients within tolerance), times both under ``jax.jit`` and prints a table. Then
it sweeps the token count for DeepSeek-V3 (forward and forward + backward), the longer runs,
with a progress bar on stderr when stderr is a terminal. Finally it writes ``demo_<backend>.png``
(times and speedups; needs matplotlib) into the current directory. Exits non-zero if any check
fails.

    python examples/demo.py                 # what `make demo` runs
    python examples/demo.py --no-plot --no-progress
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any, Callable, TextIO

import jax
import jax.numpy as jnp
import numpy as np

import jax_router as jr
from jax_router import _ffi

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from workloads import Workload, get, grad_fn, make_inputs, route_fn, verify_route  # noqa: E402

CONFIGS = ("deepseek-v3", "qwen3", "qwen3-next", "mixtral", "kimi-k2")
MODES = ("compact", "dense", "grad")
# Tokens per call: the table's, and the DeepSeek-V3 sweep's (per-device training sizes; the GPU
# goes further because its calls are short).
TABLE_TOKENS = {"cpu": 4096, "gpu": 16384}
SWEEP_TOKENS = {"cpu": (1024, 4096, 16384, 65536),
                "gpu": (4096, 16384, 65536, 262144, 1048576)}
SWEEP_CONFIG = "deepseek-v3"
MIN_PAIRS, MAX_PAIRS = 3, 50
GRAD_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(jnp.bfloat16): 2e-2}


class Progress:
    """A one-line progress bar on ``stream`` (stderr), drawn only when it is a terminal.

    Elsewhere (CI logs, pipes) it stays silent: the table lines are the progress there, and
    carriage-return redraws would fill a log with partial lines.
    """

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = enabled and isatty() and os.environ.get("TERM") != "dumb"
        self.total, self.done, self.label = total, 0, ""
        self.start = self._last = time.perf_counter()
        self._drawn = False

    def set(self, label: str) -> None:
        self.label = label
        self.draw(force=True)

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self.draw(force=True)

    def draw(self, force: bool = False) -> None:
        """Redraws the bar; between items, at most 10 times a second (timing loops call it)."""
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < 0.1):
            return
        self._last = now
        width = shutil.get_terminal_size((80, 24)).columns
        elapsed = now - self.start
        frac = self.done / self.total if self.total else 1.0
        eta = f" eta {elapsed / frac - elapsed:4.0f}s" if 0 < frac < 1 else ""
        tail = f" {self.done}/{self.total} {elapsed:4.0f}s{eta} "
        bar_w = max(10, min(30, width // 3))
        filled = int(round(bar_w * frac))
        line = "[" + "#" * filled + "." * (bar_w - filled) + "]" + tail + self.label
        self.stream.write("\r" + line[: width - 1].ljust(width - 1))
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self.enabled and self._drawn:
            width = shutil.get_terminal_size((80, 24)).columns
            self.stream.write("\r" + " " * (width - 1) + "\r")
            self.stream.flush()
            self._drawn = False

    def print(self, *args: Any) -> None:
        """print() to stdout without tearing the bar (cleared, printed, redrawn)."""
        self.clear()
        print(*args, flush=True)
        self.draw(force=True)

    def close(self) -> None:
        self.clear()


def paired_median_ms(f: Callable, g: Callable, args: tuple, budget_s: float,
                     tick: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Median ms per call of ``f(*args)`` and ``g(*args)``, both compiled and warmed up first.

    Samples alternate f, g, f, g, ... so both see the same machine load. A sample times
    ``inner`` back-to-back calls (enough for ~2 ms), so that short GPU calls are not measured
    as dispatch latency. At least ``MIN_PAIRS`` pairs; more, up to ``MAX_PAIRS``, while the
    loop is within ``budget_s``.
    """
    # Warm-up until ~50 ms are spent: a GPU that was idle runs its first calls at low clocks.
    t0 = time.perf_counter()
    calls = 0
    while calls == 0 or time.perf_counter() - t0 < 0.05:
        for fn in (f, g):
            jax.block_until_ready(fn(*args))
        calls += 1
    one = (time.perf_counter() - t0) / calls
    inner = max(1, min(100, math.ceil(2e-3 / max(one / 2, 1e-7))))
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while len(times[0]) < MAX_PAIRS:
        if len(times[0]) >= MIN_PAIRS and time.perf_counter() - start >= budget_s:
            break
        for fn, ts in zip((f, g), times):
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn(*args)
            jax.block_until_ready(out)
            ts.append((time.perf_counter() - t0) / inner)
        tick()
    return tuple(1e3 * statistics.median(ts) for ts in times)


def check_grad(g: Any, g_ref: Any, rows_ok: np.ndarray) -> list[str]:
    """Gradients equal within the dtype's tolerance, on rows routed identically."""
    g, g_ref = np.asarray(g), np.asarray(g_ref)
    rtol = GRAD_RTOL[np.dtype(g.dtype)]
    a = g.astype(np.float32)[rows_ok]
    b = g_ref.astype(np.float32)[rows_ok]
    atol = rtol * max(float(np.abs(b).max(initial=0.0)), 1e-30)
    if np.allclose(a, b, rtol=rtol, atol=atol):
        return []
    return [f"gradient differs: max abs error {float(np.abs(a - b).max()):.3g} "
            f"(atol {atol:.3g})"]


@dataclasses.dataclass
class Row:
    config: str
    describe: str
    mode: str  # compact | dense | grad
    tokens: int
    fused_ms: float
    ref_ms: float
    problems: list[str]

    @property
    def speedup(self) -> float:
        return self.ref_ms / self.fused_ms


def fused_fn(cfg: Workload, mode: str) -> Callable:
    """The library's own choice of implementation (kernels where the backend has them, pure JAX
    elsewhere), unlike ``workloads.route_fn(..., fused=True)``, which insists on the kernels."""
    if mode == "compact":
        return lambda x, b: jr.route_topk(x, cfg.topk, expert_bias=b, **cfg.options)
    return lambda x, b: jr.fused_topk_with_score_function(
        x, cfg.topk, expert_bias=b, topk_indices_dtype=jnp.int32, **cfg.options)


def run_row(cfg: Workload, mode: str, tokens: int, budget_s: float = 0.5,
            tick: Callable[[], None] = lambda: None) -> Row:
    """Routes ``tokens`` bf16 rows of ``cfg`` fused and by the reference: checked, timed."""
    logits, bias = make_inputs(cfg, tokens, jnp.bfloat16, seed=0)
    route_mode = "compact" if mode == "grad" else mode
    fused, ref = fused_fn(cfg, route_mode), route_fn(cfg, route_mode, False)
    f, g = jax.jit(fused), jax.jit(ref)
    out, ref_out = f(logits, bias), g(logits, bias)
    problems = verify_route(cfg, logits, bias, out, ref_out)
    args: tuple = (logits, bias)
    if mode == "grad":
        r = jax.random.normal(jax.random.key(7), out[0].shape, jnp.float32)
        f, g = jax.jit(grad_fn(fused)), jax.jit(grad_fn(ref))
        args = (logits, bias, r)
        # A row whose routing flipped on a near-tie (verify_route allows a few) has another
        # gradient; only identically routed rows are compared.
        same = np.asarray(out[1] == ref_out[1]).reshape(tokens, -1).all(-1)
        problems += check_grad(f(*args), g(*args), same)
    tick()
    t_fused, t_ref = paired_median_ms(f, g, args, budget_s, tick)
    return Row(cfg.name, cfg.describe(), mode, tokens, t_fused, t_ref, problems)


def fmt_ms(ms: float) -> str:
    return f"{ms:9.3f}" if ms < 10 else f"{ms:9.2f}"


def format_row(row: Row, first: str) -> str:
    return (f"{first:<61} {row.mode:<8} {fmt_ms(row.fused_ms)} {fmt_ms(row.ref_ms)} "
            f"{row.speedup:7.1f}x  {'ok' if not row.problems else 'MISMATCH'}")


def plot(table: list[Row], sweep: list[Row], path: str, title: str) -> bool:
    """Writes the two-panel PNG; False (and a one-line note) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot written (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5),
                                      gridspec_kw={"width_ratios": [1.25, 1]})
    colors = {"compact": "tab:blue", "dense": "tab:orange", "grad": "tab:green"}
    configs = list(dict.fromkeys(r.config for r in table))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        rows = {r.config: r for r in table if r.mode == mode}
        xs = [c + (i - (len(MODES) - 1) / 2) * width for c in range(len(configs))]
        ys = [rows[c].speedup if c in rows else 0.0 for c in configs]
        bars = left.bar(xs, ys, width, label=mode, color=colors[mode])
        for bar, c in zip(bars, configs):
            if c in rows and rows[c].problems:
                bar.set_hatch("xx")
        left.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    left.axhline(1.0, color="gray", lw=0.8, ls="--")
    left.set_xticks(range(len(configs)), configs, fontsize=8)
    left.set_ylabel("speedup over the jitted reference (x)")
    left.set_title(f"fused vs reference, {table[0].tokens if table else 0} bf16 tokens "
                   f"(grad: forward + backward)")
    left.legend(fontsize=8)

    for mode, style, dy in (("compact", "-", -11), ("grad", "--", 5)):
        rows = sorted((r for r in sweep if r.mode == mode), key=lambda r: r.tokens)
        if not rows:
            continue
        t = [r.tokens for r in rows]
        label = "fwd" if mode == "compact" else "fwd+bwd"
        right.loglog(t, [r.fused_ms for r in rows], style, marker="o", color="tab:blue",
                     label=f"fused {label}")
        right.loglog(t, [r.ref_ms for r in rows], style, marker="s", color="tab:red",
                     label=f"reference {label}")
        for r in rows:
            right.annotate(f"{r.speedup:.1f}x", (r.tokens, r.fused_ms), fontsize=7,
                           textcoords="offset points", xytext=(0, dy), ha="center")
    right.set_xlabel("tokens per call")
    right.set_ylabel("ms per call (median)")
    right.set_title(f"{SWEEP_CONFIG}: time vs tokens (compact, bf16)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated workloads for the table (default {','.join(CONFIGS)})")
    p.add_argument("--tokens", type=int, default=None, help="tokens per call in the table")
    p.add_argument("--sweep", default=None,
                   help="comma-separated token counts for the DeepSeek-V3 sweep ('' to skip)")
    p.add_argument("--no-plot", action="store_true", help="do not write demo_<backend>.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)

    backend = jax.default_backend()
    size_key = "gpu" if backend == "gpu" else "cpu"
    tokens = args.tokens or TABLE_TOKENS[size_key]
    sweep_tokens = (SWEEP_TOKENS[size_key] if args.sweep is None
                    else tuple(int(t) for t in args.sweep.split(",") if t.strip()))

    dev = jax.devices()[0]
    fused_path = "FFI kernels" if _ffi.default_backend_has_kernels() else "pure-JAX fallback"
    print(f"jax_router {jr.__version__} on jax {jax.__version__}")
    print(f"backend: {backend}, device: {dev.device_kind} ({dev}), fused path: {fused_path}")
    print(f"{tokens} tokens of bfloat16 logits per call; times are medians of jitted calls "
          f"(ms per call, host dispatch included)\n")

    # One routing decision up close: DeepSeek-V3 (sigmoid + bias, 8 groups keep 4, scale 2.5).
    ds = get("deepseek-v3")
    logits, bias = make_inputs(ds, 2, jnp.bfloat16, seed=1)
    w, idx = jax.jit(lambda x, b: jr.route_topk(x, ds.topk, expert_bias=b, **ds.options))(
        logits, bias)
    print(f"DeepSeek-V3 token 0 -> experts {np.asarray(idx[0]).tolist()}")
    weights = ", ".join(f"{v:.4f}" for v in np.asarray(w[0]))
    print(f"            with weights [{weights}] (sum {float(w[0].sum()):.4f} = scaling_factor)\n")

    configs = [get(c) for c in args.configs.split(",") if c.strip()]
    progress = Progress(len(configs) * len(MODES) + 2 * len(sweep_tokens),
                        enabled=not args.no_progress)
    header = (f"{'config':<12} {'router':<48} {'mode':<8} {'fused ms':>9} {'ref ms':>9} "
              f"{'speedup':>8}  check")
    print(header)
    print("-" * len(header))
    table: list[Row] = []
    try:
        for cfg in configs:
            for mode in MODES:
                progress.set(f"{cfg.name} {mode}")
                row = run_row(cfg, mode, tokens, budget_s=0.3, tick=progress.draw)
                table.append(row)
                progress.advance()
                progress.print(format_row(row, f"{cfg.name:<12} {cfg.describe():<48}"))
                for msg in row.problems:
                    progress.print(f"    {msg}")

        sweep: list[Row] = []
        if sweep_tokens:
            cfg = get(SWEEP_CONFIG)
            progress.print(f"\n{cfg.name} ({cfg.describe()}), compact, bf16: tokens per call")
            progress.print(f"{'tokens':>61} {'mode':<8} {'fused ms':>9} {'ref ms':>9} "
                           f"{'speedup':>8}  check")
            for t in sweep_tokens:
                for mode in ("compact", "grad"):
                    progress.set(f"{cfg.name} {t} tokens {mode}")
                    row = run_row(cfg, mode, t, budget_s=0.5, tick=progress.draw)
                    sweep.append(row)
                    progress.advance()
                    progress.print(format_row(row, f"{t:>61}"))
                    for msg in row.problems:
                        progress.print(f"    {msg}")
    finally:
        progress.close()

    failures = sum(bool(r.problems) for r in table + sweep)
    print()
    if not args.no_plot:
        path = f"demo_{backend}.png"
        where = backend if dev.device_kind == backend else f"{backend} ({dev.device_kind})"
        title = f"jax_router on {where}, {fused_path}, jax {jax.__version__}"
        if plot(table, sweep, path, title):
            print(f"plot written to {os.path.abspath(path)}")
    if failures:
        print(f"FAILED: {failures} of {len(table) + len(sweep)} rows disagree with the "
              f"reference")
        return 1
    print(f"all {len(table) + len(sweep)} rows match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
