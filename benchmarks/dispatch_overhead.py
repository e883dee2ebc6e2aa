"""Where the time between the kernel and a jitted call goes (GPU): per-call time of the compact
DeepSeek-V3 router through JAX under different XLA command-buffer settings, next to an XLA
elementwise op that moves the same bytes.

    python3 benchmarks/dispatch_overhead.py            # runs each setting in a subprocess

Each setting runs in its own process because XLA reads XLA_FLAGS once, at backend start.
"""

from __future__ import annotations

import os
import subprocess
import sys

SETTINGS = {
    "default": "",
    "no command buffers": "--xla_gpu_enable_command_buffer=",
    "command buffers incl. custom calls": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL",
}


def child() -> None:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_gpu import many, time_call
    from workloads import get, make_inputs, route_fn

    cfg = get("deepseek-v3")
    fused = route_fn(cfg, "compact", True)
    for T in (1024, 16384, 65536):
        sets = 8
        inputs = [make_inputs(cfg, T, jnp.bfloat16, seed=s) for s in range(sets)]
        flat = [v for x, b in inputs for v in (x, b)]
        t_one = time_call(jax.jit(fused), list(inputs[0]), 30, 2.0)
        t_many = time_call(many(fused, 2), flat, 30, 2.0) / sets
        xs = [x for x, _ in inputs]
        t_xla = time_call(many(lambda x: (x * 2).astype(jnp.bfloat16), 1), xs, 30, 2.0) / sets
        print(f"  T={T:>6}: one call per program {1e6 * t_one:7.1f} us | {sets} calls per "
              f"program {1e6 * t_many:7.1f} us/call | XLA x*2 same bytes {1e6 * t_xla:6.1f} us",
              flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
        return 0
    for name, flags in SETTINGS.items():
        print(f"{name} (XLA_FLAGS={flags!r})", flush=True)
        env = dict(os.environ, XLA_FLAGS=flags)
        r = subprocess.run([sys.executable, __file__, "--child"], env=env)
        if r.returncode:
            print(f"  failed with exit code {r.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
