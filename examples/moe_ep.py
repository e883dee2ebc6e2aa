"""An expert-parallel MoE layer routed by jax_router, checked against the same layer on one device.

The experts are split over a 1-D mesh axis ``ep`` of ``n`` devices: device ``d`` holds experts
``[d * E/n, (d+1) * E/n)`` (``E_local = E/n`` of them) and its own ``T`` tokens. Per device,
inside ``jax.shard_map``:

1. route: ``logits = x @ W_gate``; ``jax_router.route_topk`` (softmax top-k) gives
   ``weights [T, k]`` and expert ids ``[T, k]``;
2. plan and permute: ``jax_router.dispatch_plan(ids, E, capacity=C)`` and ``permute`` build the
   expert-major buffer ``[E * C, D]``. Expert ``e`` owns rows ``[e*C, (e+1)*C)``, so the buffer
   is already in destination order: ``[n, E_local * C, D]``, device ``e // E_local`` first;
3. exchange: each device sends block ``d`` to device ``d``; what arrives is source-major,
   ``[n, E_local, C, D]`` (rows from device ``s`` for local expert ``j`` at block ``(s, j)``).
   ``--exchange padded``: ``jax.lax.all_to_all`` moves all ``E * C`` rows, empty ones included.
   ``--exchange ragged``: ``jax.lax.ragged_all_to_all`` moves only the filled rows of each
   (expert, destination) block into the same layout (an ``all_to_all`` of the per-expert counts
   first tells each receiver how many rows each block has). XLA:CPU has no ragged all-to-all,
   so ``auto`` picks ragged on GPU / TPU and padded on CPU;
4. experts: a SwiGLU MLP per local expert as batched einsums over ``[E_local, n * C, D]``;
5. return and combine: the same exchange with the send and receive counts swapped brings the
   outputs back to their plan rows, and ``jax_router.unpermute`` sums each token's ``k`` expert
   outputs scaled by its routing weights.

A token's pairs past an expert's capacity ``C`` are dropped, per (source device, expert), in
token order. Without ``--capacity-factor``, ``C = T``: a token picks an expert at most once, so
nothing can be dropped. With it, ``C = min(T, ceil(factor * T * k / E))`` and pairs may drop.

The check: the layer is trained for ``--steps`` steps of plain SGD on a regression task
(targets from a fixed random teacher network), and next to it, from the same initial
parameters and on the same batches, a one-device version of the same math that uses no
dispatch at all: every expert runs on every token and a dense ``[tokens, E]`` matrix of routing
weights (zero where not routed or dropped; drops applied by the same per-device rule) combines
them. The script prints both losses per step and the largest gradient difference, and exits
non-zero unless losses, gradients and drop counts agree::

    python examples/moe_ep.py                           # 4 CPU devices (or every GPU)
    python examples/moe_ep.py --devices 8 --capacity-factor 1.0   # with drops
    python examples/moe_ep.py --devices 2 --exchange ragged       # 2 GPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from functools import partial


def _devices_flag(argv: list[str]) -> int | None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--devices", type=int, default=None)
    return p.parse_known_args(argv)[0].devices


if __name__ == "__main__":
    # The host is split into XLA devices when jax creates its CPU client, so the flag has to
    # be set before jax is imported; it does not affect GPU backends. An XLA_FLAGS that already
    # sets a count (as the test suite's does) wins, and --devices takes the first N of them.
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        _n = _devices_flag(sys.argv[1:]) or 4
        os.environ["XLA_FLAGS"] = (
            f"{_flags} --xla_force_host_platform_device_count={max(_n, 1)}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_router  # noqa: E402

AXIS = "ep"
EXCHANGES = ("auto", "padded", "ragged")


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int = 32  # per device
    dim: int = 16
    ffn: int = 32  # hidden width of each expert's SwiGLU
    experts: int = 16
    topk: int = 2
    capacity_factor: float | None = None  # None: C = tokens, nothing dropped
    steps: int = 10
    lr: float = 2.0
    seed: int = 0

    def capacity(self) -> int:
        """Rows per (source device, expert) block of the dispatch buffer."""
        if self.capacity_factor is None:
            return self.tokens
        wanted = math.ceil(self.capacity_factor * self.tokens * self.topk / self.experts)
        return max(1, min(self.tokens, wanted))


PRESETS = {
    "cpu": Config(),
    # Capacity factor 2: with C = T every device would run E / k times the expert work it needs.
    "gpu": Config(tokens=4096, dim=512, ffn=1024, experts=32, topk=4, capacity_factor=2.0,
                  steps=10, lr=10.0),
}


# --- The layer ------------------------------------------------------------------------------


def swiglu_experts(x, w_gate, w_up, w_down):
    """``x [E', M, D]`` through expert ``e``'s SwiGLU for each ``e`` of ``E'`` -> ``[E', M, D]``.

    Rows of zeros give zeros (no biases), so the empty rows of a padded buffer stay empty.
    """
    h = jax.nn.silu(jnp.einsum("emd,edf->emf", x, w_gate)) * jnp.einsum("emd,edf->emf", x, w_up)
    return jnp.einsum("emf,efd->emd", h, w_down)


def init_params(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    E, D, F = cfg.experts, cfg.dim, cfg.ffn

    def normal(shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    return dict(gate=normal((D, E), D), w_gate=normal((E, D, F), D), w_up=normal((E, D, F), D),
                w_down=normal((E, F, D), F))


def padded_exchange(buf, send_sizes, recv_sizes):
    """Block ``d`` of ``buf [n * B, D]`` to device ``d``; blocks arrive in source order."""
    del send_sizes, recv_sizes  # every row moves, filled or not
    return jax.lax.all_to_all(buf, AXIS, 0, 0, tiled=True)


def ragged_exchange(buf, send_sizes, recv_sizes, *, capacity: int):
    """What ``padded_exchange`` does, moving only the first ``send_sizes[i]`` rows of each block.

    ``buf`` is ``E`` blocks of ``capacity`` rows, block ``i = d * E_local + j`` bound for device
    ``d``'s local expert slot ``j``. On the way out it is the plan buffer (``i`` = the expert),
    on the way back the receiver's source-major buffer (``i = source * E_local + local expert``,
    returning to that source as its global expert ``me * E_local + j``): in both directions the
    block lands at block ``me * E_local + j`` of the receiver, so one formula serves both.
    ``recv_sizes[i]``: the rows of the block that device ``i // E_local`` sends here.
    """
    n, me = jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS)
    blocks = send_sizes.shape[0]
    i = jnp.arange(blocks, dtype=jnp.int32)
    input_offsets = i * capacity
    output_offsets = (me * (blocks // n) + i % (blocks // n)).astype(jnp.int32) * capacity
    # Rows no block fills stay zero: the experts map them to zero, and nothing sends them back.
    return jax.lax.ragged_all_to_all(buf, jnp.zeros_like(buf), input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=AXIS)


def local_moe(params, x, *, topk: int, capacity: int, exchange):
    """One device's part of the layer (inside ``shard_map`` over ``AXIS``).

    ``params``: the replicated ``gate [D, E]`` and this device's expert weights ``[E_local, ...]``;
    ``x [T, D]``: this device's tokens. Returns ``(y [T, D], dropped pairs)``, the count
    summed over devices (every other pair fills one row of the exchanged buffers).
    """
    n = jax.lax.axis_size(AXIS)
    num_experts, (e_local, _, dim) = params["gate"].shape[-1], params["w_down"].shape
    weights, ids = jax_router.route_topk(x @ params["gate"], topk)
    plan = jax_router.dispatch_plan(ids, num_experts, capacity=capacity)
    rows = jax_router.permute(x, plan)  # [E * C, D], blocks in destination order
    filled = jnp.minimum(plan.tokens_per_expert, capacity)  # rows of each expert's block
    # How many rows each source sends to each of this device's experts (source-major).
    arriving = jax.lax.all_to_all(filled, AXIS, 0, 0, tiled=True)
    recv = exchange(rows, filled, arriving).reshape(n, e_local, capacity, dim)
    by_expert = recv.transpose(1, 0, 2, 3).reshape(e_local, n * capacity, dim)
    out = swiglu_experts(by_expert, params["w_gate"], params["w_up"], params["w_down"])
    out = out.reshape(e_local, n, capacity, dim).transpose(1, 0, 2, 3).reshape(-1, dim)
    back = exchange(out, arriving, filled)  # [E * C, D], rows where the plan put them
    y = jax_router.unpermute(back, plan, weights)
    dropped = jnp.sum(plan.positions < 0)  # route_topk's ids are all in [0, E)
    return y, jax.lax.psum(dropped, AXIS)


def expert_parallel_layer(cfg: Config, mesh: jax.sharding.Mesh, exchange_kind: str):
    """``(params, x [n * T, D]) -> (y, dropped pairs)`` over ``mesh``'s ``AXIS``."""
    if exchange_kind == "ragged":
        exchange = partial(ragged_exchange, capacity=cfg.capacity())
    else:
        exchange = padded_exchange
    experts_spec = P(AXIS)  # the expert dim, split over the devices
    specs = dict(gate=P(), w_gate=experts_spec, w_up=experts_spec, w_down=experts_spec)
    return jax.shard_map(
        partial(local_moe, topk=cfg.topk, capacity=cfg.capacity(), exchange=exchange),
        mesh=mesh, in_specs=(specs, P(AXIS)), out_specs=(P(AXIS), P()))


def one_device_layer(cfg: Config, n: int):
    """The same layer without dispatch: every expert on every token, dense routing weights.

    Drops follow the expert-parallel rule: the tokens are ``n`` devices' blocks of ``T``, and
    a (token, slot) pair is kept if fewer than ``C`` earlier pairs of its block (in flat
    ``token * k + slot`` order) went to the same expert.
    """
    capacity = cfg.capacity()

    def layer(params, x):
        E = params["gate"].shape[-1]
        weights, ids = jax_router.route_topk(x @ params["gate"], cfg.topk)
        onehot = jax.nn.one_hot(ids, E, dtype=jnp.int32)  # [n * T, k, E]
        per_device = onehot.reshape(n, cfg.tokens * cfg.topk, E)
        earlier = (jnp.cumsum(per_device, axis=1) - per_device).reshape(onehot.shape)
        kept = jnp.sum(earlier * onehot, axis=-1) < capacity  # [n * T, k]
        dense = jnp.einsum("tk,tke->te", jnp.where(kept, weights, 0.0), onehot.astype(x.dtype))
        every = swiglu_experts(jnp.broadcast_to(x, (E,) + x.shape), params["w_gate"],
                               params["w_up"], params["w_down"])  # [E, n * T, D]
        return jnp.einsum("te,etd->td", dense, every), jnp.sum(~kept)

    return layer


# --- Training and the check -----------------------------------------------------------------


def sgd_step(layer, lr: float):
    """``(params, x, y) -> (new params, loss, grads, dropped)``: one SGD step on the MSE."""

    def loss_fn(params, x, target):
        pred, dropped = layer(params, x)
        return jnp.mean((pred - target) ** 2), dropped

    def step(params, x, target):
        (loss, dropped), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, target)
        new = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return new, loss, grads, dropped

    return jax.jit(step)


def max_grad_difference(a: dict, b: dict) -> tuple[float, float]:
    """``(max |a - b|, max |b|)`` over every leaf of two gradient pytrees of the same shapes."""
    diff = max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in b)
    scale = max(float(np.max(np.abs(np.asarray(b[k])))) for k in b)
    return diff, scale


# float32 sums in different orders (the reference adds E products per token, unpermute k);
# measured below 1e-6 relative on CPU. A wrong row or a dropped pair shows up at 1e-2 or more.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def mismatches(loss_ep: float, loss_ref: float, grad_diff: float, grad_scale: float,
               dropped_ep: int, dropped_ref: int) -> list[str]:
    """Why one step's expert-parallel result is not the one-device one (empty: it is)."""
    problems = []
    if not abs(loss_ep - loss_ref) <= LOSS_RTOL * abs(loss_ref):
        problems.append(f"loss {loss_ep!r} != {loss_ref!r}")
    if not grad_diff <= GRAD_RTOL * grad_scale:
        problems.append(f"max |grad difference| {grad_diff:.3g} > {GRAD_RTOL} * max |grad| "
                        f"{grad_scale:.3g}")
    if dropped_ep != dropped_ref:
        problems.append(f"dropped pairs {dropped_ep} != {dropped_ref}")
    return problems


@dataclasses.dataclass
class Result:
    exchange: str
    loss_ep: list[float]
    loss_ref: list[float]
    grad_diff: list[float]  # max |grad_ep - grad_ref| per step
    dropped: list[int]  # per step, expert-parallel
    problems: list[str]
    seconds: float  # the expert-parallel steps, compilation included

    @property
    def ok(self) -> bool:
        return not self.problems


def resolve_exchange(exchange: str, platform: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if exchange == "auto":
        # XLA:CPU cannot compile ragged-all-to-all; GPU and TPU backends can.
        return "padded" if platform == "cpu" else "ragged"
    return exchange


def run(cfg: Config, devices: list, exchange: str = "auto", log=print) -> Result:
    n = len(devices)
    if cfg.experts % n:
        raise ValueError(f"experts ({cfg.experts}) must be a multiple of the {n} devices")
    exchange = resolve_exchange(exchange, devices[0].platform)
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(cfg.seed)
    init = init_params(cfg, rng)
    teacher = [(rng.standard_normal((cfg.dim, 2 * cfg.dim)) / np.sqrt(cfg.dim)).astype(np.float32),
               (rng.standard_normal((2 * cfg.dim, cfg.dim)) / np.sqrt(2 * cfg.dim)).astype(
                   np.float32)]

    def batch(step):
        x = np.random.default_rng((cfg.seed, step)).standard_normal(
            (n * cfg.tokens, cfg.dim)).astype(np.float32)
        return x, np.tanh(x @ teacher[0]) @ teacher[1]

    def sharding(name):
        return NamedSharding(mesh, P() if name == "gate" else P(AXIS))

    params_ep = {k: jax.device_put(v, sharding(k)) for k, v in init.items()}
    params_ref = jax.device_put(init, devices[0])
    step_ep = sgd_step(expert_parallel_layer(cfg, mesh, exchange), cfg.lr)
    step_ref = sgd_step(one_device_layer(cfg, n), cfg.lr)

    C = cfg.capacity()
    log(f"jax_router {jax_router.__version__}, jax {jax.__version__}, {n} x "
        f"{devices[0].device_kind} ({devices[0].platform})")
    log(f"MoE: E={cfg.experts} ({cfg.experts // n} per device), top-{cfg.topk}, D={cfg.dim}, "
        f"SwiGLU F={cfg.ffn}; {cfg.tokens} tokens per device, capacity C={C} per (device, "
        f"expert){' (= tokens: nothing can drop)' if C == cfg.tokens else ''}")
    log(f"exchange: {exchange} (buffer [E*C, D] = [{cfg.experts * C}, {cfg.dim}] per device; "
        f"{'all rows move' if exchange == 'padded' else 'only filled rows move'})")
    log(f"{'step':>4}  {'loss (ep)':>12}  {'loss (1 dev)':>12}  {'max|grad|':>9}  "
        f"{'max|dgrad|':>10}  "
        f"{'dropped':>7}  rows filled / sent")
    result = Result(exchange, [], [], [], [], [], 0.0)
    start = time.perf_counter()
    # Both versions must see the same float32 products: with the default precision a GPU runs
    # float32 matmuls in TF32, whose rounding would differ between the two layouts and could
    # flip near-tied top-k choices. The steps are traced (and compiled) inside the context.
    with jax.default_matmul_precision("highest"):
        for step in range(cfg.steps):
            x, target = batch(step)
            x_ep = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
            t_ep = jax.device_put(target, NamedSharding(mesh, P(AXIS)))
            params_ep, loss_ep, grads_ep, dropped_ep = step_ep(params_ep, x_ep, t_ep)
            # Fetched every step: the host needs the numbers, and on XLA:CPU several queued
            # collective steps can starve its shared thread pool.
            loss_ep, dropped_ep = float(loss_ep), int(dropped_ep)
            result.seconds += time.perf_counter() - start
            params_ref, loss_ref, grads_ref, dropped_ref = step_ref(
                params_ref, *jax.device_put((x, target), devices[0]))
            diff, scale = max_grad_difference(grads_ep, grads_ref)
            filled = n * cfg.tokens * cfg.topk - dropped_ep  # rows carrying a (token, slot)
            sent = n * cfg.experts * C if exchange == "padded" else filled
            log(f"{step:4d}  {loss_ep:12.6f}  {float(loss_ref):12.6f}  {scale:9.2e}  "
                f"{diff:10.2e}  {dropped_ep:7d}  {filled} / {sent}")
            result.loss_ep.append(loss_ep)
            result.loss_ref.append(float(loss_ref))
            result.grad_diff.append(diff)
            result.dropped.append(dropped_ep)
            result.problems += [f"step {step}: {p}" for p in mismatches(
                loss_ep, float(loss_ref), diff, scale, dropped_ep, int(dropped_ref))]
            start = time.perf_counter()
    return result


# --- Command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=None,
                   help="devices on the ep axis (default: 4 host devices on CPU, every GPU)")
    p.add_argument("--exchange", choices=EXCHANGES, default="auto",
                   help="token exchange: all_to_all of the padded buffer, ragged_all_to_all of "
                        "the filled rows, or auto (ragged unless on CPU)")
    p.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                   help="size preset (auto: gpu on a GPU backend, cpu otherwise)")
    p.add_argument("--tokens", type=int, help="tokens per device")
    p.add_argument("--dim", type=int, help="model width D")
    p.add_argument("--ffn", type=int, help="hidden width F of each expert's SwiGLU")
    p.add_argument("--experts", type=int, help="experts E, a multiple of --devices")
    p.add_argument("--topk", type=int, help="experts per token")
    p.add_argument("--capacity-factor", type=float,
                   help="C = ceil(factor * tokens * topk / experts) (at most tokens); default "
                        "of the cpu preset: C = tokens, dropless")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, help="SGD learning rate")
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    preset = args.preset if args.preset != "auto" else (
        "cpu" if jax.default_backend() == "cpu" else "gpu")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    for name in ("tokens", "dim", "ffn", "experts", "topk", "steps"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.topk > cfg.experts:
        p.error(f"--topk ({cfg.topk}) must be <= --experts ({cfg.experts})")
    if cfg.capacity_factor is not None and not cfg.capacity_factor > 0:
        p.error(f"--capacity-factor must be > 0, got {cfg.capacity_factor}")
    available = len(jax.devices())
    if args.devices is None:
        args.devices = available
    # the arguments' own consistency first, then what this machine has
    if args.devices >= 1 and cfg.experts % args.devices:
        p.error(f"--experts ({cfg.experts}) must be a multiple of --devices ({args.devices})")
    if not 1 <= args.devices <= available:
        p.error(f"--devices must be in [1, {available}] (the {jax.default_backend()} devices "
                f"present), got {args.devices}")
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    result = run(cfg, jax.devices()[:args.devices], args.exchange)
    tag = (f"{len(result.loss_ep)} steps, {args.devices} devices, {result.exchange} exchange, "
           f"max |dgrad| {max(result.grad_diff):.2e}, {sum(result.dropped)} pairs dropped")
    print(f"expert-parallel steps took {result.seconds:.2f} s (compilation included)")
    if not result.ok:
        print("\n".join(result.problems))
        print(f"MISMATCH: the expert-parallel layer differs from the one-device layer ({tag})")
        return 1
    print(f"OK: expert-parallel losses and gradients equal the one-device layer's ({tag})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
