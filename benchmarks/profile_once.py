"""One call of each dispatch op and of quantile balancing at benchmark size, for a profiler
(gpu_run.sh's `profile` step: Nsight Compute's per-kernel duration and throughput)."""

import jax
import jax.numpy as jnp

import jax_router as jr

T, K, E, H = 65536, 8, 256, 7168
ids = jax.random.randint(jax.random.key(0), (T, K), 0, E, jnp.int32)
plan = jax.block_until_ready(jax.jit(lambda i: jr.dispatch_plan(i, E))(ids))
x = jax.random.normal(jax.random.key(1), (T // 4, H), jnp.bfloat16)
small = jax.jit(lambda i: jr.dispatch_plan(i, E))(ids[: T // 4])
rows = jax.block_until_ready(jax.jit(jr.permute)(x, small))
w = jnp.ones((T // 4, K), jnp.float32)
jax.block_until_ready(jax.jit(jr.unpermute)(rows, small, w))
logits = jax.random.normal(jax.random.key(2), (T, 896), jnp.float32).astype(jnp.bfloat16)
bias = jnp.zeros((896,), jnp.float32)
jax.block_until_ready(jax.jit(lambda l: jr.route_topk_qb(l, 16, bias, jnp.array([-1.0, 1.0]),
                                                         1000))(logits))
print("profile_once: done")
