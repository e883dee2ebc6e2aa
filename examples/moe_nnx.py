"""A Flax NNX Mixture-of-Experts block routed by jax_router, trained data-parallel (make example).

The block, per token ``x [D]``:

1. gate: ``logits = x @ W_gate`` (an ``nnx.Linear``, E outputs);
2. route: ``jax_router.route_topk`` with DeepSeek-V3-style routing -- sigmoid scores, a
   selection-only ``expert_bias``, group-limited top-k and a scaling factor -- giving compact
   ``weights [T, k]`` and dense ``indices [T, k]``; no ``[T, E]`` tensor is written;
3. dispatch: ``jax_router.dispatch_plan`` with ``capacity = C * T * k / E``
   (``--capacity-factor C``) places each (token, expert) pair in an expert-major
   ``[E * capacity, D]`` buffer, which ``jax_router.permute`` fills; an expert's pairs past its
   capacity are dropped (in token order), which the load balancing below makes rare;
4. experts: a two-layer GELU MLP per expert, its weights stacked ``[E, D, H]`` / ``[E, H, D]``,
   all experts run as one batched matmul over the buffer viewed as ``[E, capacity, D]``;
5. combine: ``jax_router.unpermute`` sums each token's expert outputs, scaled by its routing
   weights.

Load balancing is DeepSeek-V3's auxiliary-loss-free rule: after every optimizer step,
``expert_bias += rate * sign(mean_load - load_e)``. The bias lives in an ``nnx.Variable``
subclass that is not an ``nnx.Param``, so neither the gradient nor the optimizer touches it.

Training is data-parallel over every local device: a 1-D ``Mesh``, the batch placed with
``NamedSharding(mesh, P("data"))``, parameters and optimizer state replicated. The router runs
on the sharded logits under ``jax.jit`` (its partitioning rule keeps tokens local); dispatch,
experts and combine run per device inside ``jax.shard_map``, and the per-expert token counts
are summed across devices for the bias update. The task is regression onto a fixed random
teacher network. Inputs have a non-zero mean, as real hidden states do, which skews the
untrained gate towards a few experts: the bias rule has an imbalance to remove.

On CPU the script splits the host into ``--cpu-devices`` XLA devices (default 4) so that the
sharding is real. Defaults are small on CPU (a few seconds of training on 2 cores) and larger
on GPU; every size flag overrides its preset::

    python examples/moe_nnx.py                      # preset chosen by the default backend
    python examples/moe_nnx.py --steps 500 --plot   # also writes moe_nnx_<backend>.png
    python examples/moe_nnx.py --bias-rate 0        # the same run without load balancing
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def _cpu_devices_flag(argv: list[str]) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--cpu-devices", type=int, default=4)
    return p.parse_known_args(argv)[0].cpu_devices


if __name__ == "__main__":
    # Must happen before jax creates its CPU client; it does not affect GPU backends.
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        os.environ["XLA_FLAGS"] = (
            f"{_flags} --xla_force_host_platform_device_count={_cpu_devices_flag(sys.argv[1:])}"
        ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_router  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 200
    batch: int = 1024  # tokens per step, split across devices
    dim: int = 32
    hidden: int = 64
    experts: int = 16
    topk: int = 4
    groups: int = 4
    group_topk: int = 2
    scaling_factor: float = 2.5
    capacity_factor: float = 2.0  # expert buffer rows = factor * T * k / E (per device)
    lr: float = 3e-3
    bias_rate: float = 1e-2
    input_offset: float = 1.0  # mean of the inputs: skews the untrained gate
    seed: int = 0
    log_every: int = 20


# Adam moves every gate weight by about lr per step, so a token's logits move by up to about
# lr * dim: much above ~0.1 per step the gate locks onto a few experts faster than the bias rule
# (rate per step) can pull the load back (on the GPU preset, lr 1e-3 ends with max/mean load ~4,
# lr 1e-4 with ~1.4). Hence the smaller lr for the wider model.
PRESETS = {
    "cpu": Config(),
    "gpu": Config(steps=500, batch=32768, dim=512, hidden=1024, experts=64, topk=8, groups=8,
                  group_topk=4, lr=1e-4, log_every=50),
}


class ExpertBias(nnx.Variable):
    """Selection-only routing bias: moved by the load rule, invisible to grad and optimizer."""


class MoE(nnx.Module):
    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, *, rngs: nnx.Rngs):
        E, D, H = cfg.experts, cfg.dim, cfg.hidden
        self.topk, self.groups, self.group_topk = cfg.topk, cfg.groups, cfg.group_topk
        self.scaling_factor = cfg.scaling_factor
        self.capacity_factor = cfg.capacity_factor
        self.mesh = mesh
        self.gate = nnx.Linear(D, E, use_bias=False, rngs=rngs)
        # batch_axis=0: fan-in is D (or H) per expert, not E * D.
        init = jax.nn.initializers.lecun_normal(batch_axis=0)
        self.w_in = nnx.Param(init(rngs.params(), (E, D, H)))
        self.w_out = nnx.Param(init(rngs.params(), (E, H, D)))
        self.expert_bias = ExpertBias(jnp.zeros((E,), jnp.float32))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x [T, D]`` (sharded on T) -> ``(y, load [E], dropped)``, see ``_local_experts``."""
        weights, indices = jax_router.route_topk(
            self.gate(x), self.topk, score_function="sigmoid",
            expert_bias=self.expert_bias[...], num_groups=self.groups,
            group_topk=self.group_topk, scaling_factor=self.scaling_factor)
        experts = jax.shard_map(
            self._local_experts, mesh=self.mesh,
            in_specs=(P("data"), P("data"), P("data"), P(), P()),
            out_specs=(P("data"), P(), P()))
        return experts(x, weights, indices, self.w_in[...], self.w_out[...])

    def _local_experts(self, x, weights, indices, w_in, w_out):
        """One device's tokens: planned dispatch, batched expert MLPs, weighted combine.

        Returns ``(y [T, D], load [E], dropped)``, load and dropped summed over devices.
        """
        num_experts = w_in.shape[0]
        # Fixed [E, capacity, D] buffers, so all experts run as one batched matmul; pairs past
        # an expert's capacity are dropped (the token keeps its other experts), which a
        # balanced load avoids. (jax.lax.ragged_dot would be dropless, but XLA expands it to
        # dense per-expert products here: E times the work, and out of memory at GPU sizes.)
        cap = max(1, int(np.ceil(self.capacity_factor * indices.size / num_experts)))
        plan = jax_router.dispatch_plan(indices, num_experts, capacity=cap)
        buf = jax_router.permute(x, plan).reshape(num_experts, cap, -1)
        h = jax.nn.gelu(jnp.einsum("ecd,edh->ech", buf, w_in))
        out = jnp.einsum("ech,ehd->ecd", h, w_out).reshape(num_experts * cap, -1)
        y = jax_router.unpermute(out, plan, weights)
        # Every id from route_topk is in [0, E), so a dropped pair is one past capacity.
        dropped = jnp.sum(plan.positions < 0)
        return y, jax.lax.psum(plan.tokens_per_expert, "data"), jax.lax.psum(dropped, "data")

    def update_bias(self, load: jax.Array, rate: float) -> None:
        load = load.astype(jnp.float32)
        self.expert_bias[...] += rate * jnp.sign(jnp.mean(load) - load)


def make_mesh() -> jax.sharding.Mesh:
    # Auto axes: the router's partitioning rule and GSPMD decide the intermediate shardings.
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicate(obj, mesh: jax.sharding.Mesh) -> None:
    state = nnx.state(obj)
    nnx.update(obj, jax.device_put(state, NamedSharding(mesh, P())))


@dataclasses.dataclass
class History:
    loss: np.ndarray  # [steps]
    load: np.ndarray  # [steps, E] tokens per expert (top-k slots counted), before each update
    dropped: np.ndarray  # [steps] fraction of (token, expert) pairs past an expert's capacity
    bias: np.ndarray  # [E] final expert bias
    seconds: float  # training wall time, compilation included

    @property
    def imbalance(self) -> np.ndarray:
        """max / mean load per step (1.0 = perfectly balanced)."""
        return self.load.max(-1) / self.load.mean(-1)

    @property
    def min_ratio(self) -> np.ndarray:
        """min / mean load per step (0.0 = some expert got no token)."""
        return self.load.min(-1) / self.load.mean(-1)


def train(cfg: Config, log=print) -> History:
    mesh = make_mesh()
    n = mesh.size
    if cfg.batch % n:
        raise ValueError(f"--batch {cfg.batch} must be a multiple of the {n} devices")
    data_sharding = NamedSharding(mesh, P("data"))

    model_key, data_key = jax.random.split(jax.random.key(cfg.seed, impl="rbg"))
    # The teacher and the input offset are drawn on the host: drawn under jit, each shape
    # costs its own compilation of the random generator (seconds on a small CPU).
    rng = np.random.default_rng(cfg.seed)
    teacher = jax.device_put((
        (rng.standard_normal((cfg.dim, 4 * cfg.dim)) / np.sqrt(cfg.dim)).astype(np.float32),
        (rng.standard_normal((4 * cfg.dim, cfg.dim)) / np.sqrt(4 * cfg.dim)).astype(np.float32),
        (cfg.input_offset * rng.standard_normal(cfg.dim)).astype(np.float32),
    ), NamedSharding(mesh, P()))

    @jax.jit
    def make_batch(step, teacher):
        a, b, offset = teacher
        x = jax.random.normal(jax.random.fold_in(data_key, step), (cfg.batch, cfg.dim))
        y = jnp.tanh(x @ a) @ b
        x, y = (jax.lax.with_sharding_constraint(v, data_sharding) for v in (x + offset, y))
        return x, y

    @nnx.jit
    def create():
        model = MoE(cfg, mesh, rngs=nnx.Rngs(model_key))
        return model, nnx.Optimizer(model, optax.adam(cfg.lr), wrt=nnx.Param)

    model, optimizer = create()
    replicate(model, mesh)
    replicate(optimizer, mesh)

    def loss_fn(model, x, y):
        pred, load, dropped = model(x)
        return jnp.mean((pred - y) ** 2), (load, dropped)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        (loss, (load, dropped)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        optimizer.update(model, grads)
        model.update_bias(load, cfg.bias_rate)  # after the step, from this batch's load
        return loss, load, dropped

    # nnx.jit walks the model and optimizer graphs on every call (~15 ms on a small CPU, more
    # than the tiny model's step); the cached partial walks them once.
    step_fn = nnx.cached_partial(train_step, model, optimizer)

    log(f"MoE block: D={cfg.dim}, H={cfg.hidden}, E={cfg.experts}, k={cfg.topk}, sigmoid + "
        f"expert_bias, groups {cfg.groups}/{cfg.group_topk}, scale {cfg.scaling_factor}")
    log(f"data parallel over {n} {jax.devices()[0].platform} device(s): {cfg.batch} tokens "
        f"per step ({cfg.batch // n} per device), {cfg.steps} steps, adam lr {cfg.lr}, "
        f"bias rate {cfg.bias_rate}")
    pairs = cfg.batch * cfg.topk
    # XLA:CPU runs every device's share of a step on one shared thread pool, and a collective
    # waits until all shares have arrived; with several steps queued, the pool can fill with
    # shares of different steps all waiting on each other (a deadlock on a 2-core machine).
    # Elsewhere steps are queued asynchronously and fetched at the end.
    sync_each_step = mesh.devices.flat[0].platform == "cpu"
    history = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        out = step_fn(*make_batch(step, teacher))
        history.append(out)
        if sync_each_step:
            jax.block_until_ready(out)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            loss, load, dropped = (np.asarray(a, np.float64) for a in out)
            log(f"step {step:5d}  loss {loss:.4f}  load max/mean {load.max() / load.mean():.2f}"
                f"  min/mean {load.min() / load.mean():.2f}  dropped {dropped / pairs:.1%}")
    loss, load, dropped = (np.asarray(a, np.float64) for a in zip(*jax.device_get(history)))
    return History(loss, load, dropped / pairs, np.asarray(model.expert_bias[...]),
                   time.perf_counter() - start)


def summarize(h: History, log=print) -> None:
    w = max(1, min(20, len(h.loss) // 5))  # first / last window, to smooth per-batch noise
    log(f"loss      first {w} steps {h.loss[:w].mean():.4f} -> last {w} {h.loss[-w:].mean():.4f}")
    log(f"load max/mean {h.imbalance[0]:.2f} at step 0 -> {h.imbalance[-w:].mean():.2f} over the "
        f"last {w} (1.00 = balanced); min/mean {h.min_ratio[0]:.2f} -> "
        f"{h.min_ratio[-w:].mean():.2f}")
    log(f"dropped pairs {h.dropped[:w].mean():.1%} -> {h.dropped[-w:].mean():.1%}")
    log(f"final load per expert: {h.load[-1].astype(int).tolist()}")
    log(f"expert_bias range [{h.bias.min():+.3f}, {h.bias.max():+.3f}]; "
        f"{len(h.loss)} steps in {h.seconds:.1f} s (compilation included)")


def plot(h: History, path: str, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = np.arange(len(h.loss))
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(8, 9), sharex=True,
                                  gridspec_kw={"height_ratios": [1, 1, 1.2]})
    a.semilogy(steps, h.loss)
    a.set_ylabel("MSE loss")
    a.set_title(title)
    b.plot(steps, h.imbalance, label="max / mean")
    b.plot(steps, h.min_ratio, label="min / mean")
    b.plot(steps, h.dropped, label="dropped pairs (fraction)")
    b.axhline(1.0, color="gray", lw=0.8, ls="--")
    b.set_ylabel("expert load")
    b.legend(loc="upper right")
    im = c.imshow((h.load / h.load.mean(-1, keepdims=True)).T, aspect="auto",
                  interpolation="nearest", cmap="viridis", origin="lower",
                  extent=(-0.5, len(steps) - 0.5, -0.5, h.load.shape[1] - 0.5))
    fig.colorbar(im, ax=c, orientation="horizontal", pad=0.25, fraction=0.05,
                 label="load / mean load")
    c.set_ylabel("expert")
    c.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    c.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                   help="size preset (auto: gpu on a GPU backend, cpu otherwise)")
    types = {"int": int, "float": float}  # field types are strings (postponed annotations)
    for f in dataclasses.fields(Config):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=types[f.type], default=None,
                       help=f"override the preset's {f.name}")
    p.add_argument("--cpu-devices", type=int, default=4,
                   help="XLA host devices to split the CPU into (unless XLA_FLAGS sets it)")
    p.add_argument("--plot", nargs="?", const="auto", default=None, metavar="PNG",
                   help="write loss and load over steps to PNG (default moe_nnx_<backend>.png)")
    args = p.parse_args(argv)
    preset = args.preset if args.preset != "auto" else (
        "gpu" if jax.default_backend() == "gpu" else "cpu")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(PRESETS[preset], **overrides), args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    print(f"jax_router {jax_router.__version__}, jax {jax.__version__}, "
          f"backend {jax.default_backend()}")
    h = train(cfg)
    summarize(h)
    if args.plot:
        path = f"moe_nnx_{jax.default_backend()}.png" if args.plot == "auto" else args.plot
        title = (f"NNX MoE + jax_router on {jax.device_count()} x {jax.devices()[0].device_kind}"
                 f" (E={cfg.experts}, k={cfg.topk}, bias rate {cfg.bias_rate})")
        if plot(h, path, title):
            print(f"plot written to {os.path.abspath(path)}")
    return 0 if np.isfinite(h.loss).all() else 1


if __name__ == "__main__":
    sys.exit(main())
