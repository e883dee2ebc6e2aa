"""Named MoE router configurations of real models: the one table the demo and benchmarks share.

Each ``Workload`` holds the number of experts ``E``, ``topk`` and the keyword arguments of
``jax_router.route_topk`` / ``fused_topk_with_score_function`` except the bias array itself:
``has_bias`` says whether the model routes with a selection-only ``expert_bias`` [E], which
``make_inputs`` draws.

Sources: MaxText model configs
(deepseek3-671b, kimi-k2-1t, qwen3-30b-a3b, qwen3-next-80b-a3b, mixtral-8x7b) and SGLang's
router comment for the 896-expert / top-16 tier. Softmax models renormalise over their top-k
(``norm_topk_prob`` / Mixtral's softmax over the top-2), which is ``use_pre_softmax=False``.

Usage (scripts in benchmarks/ import it as ``workloads``; others put benchmarks/ on sys.path)::

    from workloads import WORKLOADS, get, make_inputs
    cfg = get("deepseek-v3")
    logits, bias = make_inputs(cfg, tokens=4096, dtype=jnp.bfloat16, seed=0)
    w, idx = jax_router.route_topk(logits, cfg.topk, expert_bias=bias, **cfg.kwargs)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jax_router as jr
from jax_router import reference


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model's router: ``E`` experts, ``topk`` per token, API options, bias or not."""

    name: str
    E: int
    topk: int
    kwargs: tuple[tuple[str, Any], ...] = ()  # static API options (hashable), no expert_bias
    has_bias: bool = False
    note: str = ""

    @property
    def options(self) -> dict[str, Any]:
        """The API keyword arguments (score_function, num_groups, ...), without expert_bias."""
        return dict(self.kwargs)

    def describe(self) -> str:
        o = self.options
        parts = [f"E={self.E}", f"k={self.topk}", o.get("score_function", "softmax")]
        if self.has_bias:
            parts.append("bias")
        if o.get("num_groups"):
            parts.append(f"groups {o['num_groups']}/{o['group_topk']}")
        if o.get("scaling_factor") not in (None, 1.0):
            parts.append(f"scale {o['scaling_factor']}")
        return ", ".join(parts)


def _w(name, E, topk, *, has_bias=False, note="", **kwargs) -> Workload:
    return Workload(name, E, topk, tuple(sorted(kwargs.items())), has_bias, note)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        _w("deepseek-v3", 256, 8, score_function="sigmoid", num_groups=8, group_topk=4,
           scaling_factor=2.5, has_bias=True, note="DeepSeek-V3 671B (noaux_tc)"),
        _w("qwen3", 128, 8, score_function="softmax",
           note="Qwen3-30B-A3B / 235B-A22B (norm_topk_prob)"),
        _w("mixtral", 8, 2, score_function="softmax", note="Mixtral 8x7B / 8x22B"),
        _w("kimi-k2", 384, 8, score_function="sigmoid", scaling_factor=2.827, has_bias=True,
           note="Kimi K2 1T"),
        _w("qwen3-next", 512, 10, score_function="softmax",
           note="Qwen3-Next-80B / Qwen3.5-397B"),
        _w("large", 896, 16, score_function="sigmoid", has_bias=True,
           note="896-expert / top-16 tier (Kimi K3 class)"),
    )
}


def get(name: str) -> Workload:
    """The workload called ``name`` (case-insensitive; '_' and '-' are interchangeable)."""
    key = name.lower().replace("_", "-")
    if key not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[key]


def make_inputs(
    cfg: Workload, tokens: int, dtype: Any = jnp.bfloat16, seed: int = 0
) -> tuple[jax.Array, jax.Array | None]:
    """Random router inputs for ``cfg``: ``(logits [tokens, E] of dtype, bias float32 [E] | None)``.

    Logits are standard normal, drawn in float32 then cast (never zeros: all-equal rows would
    only test tie-breaking); the bias, when the model has one, is ``0.1 * normal`` float32.
    """
    k_logits, k_bias = jax.random.split(jax.random.key(seed))
    logits = jax.random.normal(k_logits, (tokens, cfg.E), jnp.float32).astype(dtype)
    bias = 0.1 * jax.random.normal(k_bias, (cfg.E,), jnp.float32) if cfg.has_bias else None
    return logits, bias


def selection_scores(cfg: Workload, logits: jax.Array, bias: jax.Array | None) -> np.ndarray:
    """The selection score ``z`` (docs/semantics.md#forward-selection-score) as float32 numpy, to judge near-ties."""
    from jax_router import ScoreFunction, reference
    from jax_router.options import make_options

    opts = make_options(logits, cfg.topk, expert_bias=bias, **cfg.options)
    x = jnp.asarray(logits).astype(jnp.float32)
    if opts.score_function == ScoreFunction.SOFTMAX:
        z = jax.nn.softmax(x, axis=-1) if opts.use_pre_softmax else x
    else:
        z = reference.activation(opts.score_function, x)
        z = z + bias.astype(jnp.float32) if bias is not None else z
    return np.asarray(z)


# Tolerance on weights / probs by output dtype: float32 weights differ from XLA's only by ulps
# of exp; half-precision probs may round to the neighbouring value.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(jnp.bfloat16): 1e-2, np.dtype(np.float16): 2e-3}


def _selected(out: np.ndarray, E: int) -> np.ndarray:
    """Indices [T, k] or a bool map [T, E] -> bool membership [T, E]."""
    if out.dtype == np.bool_:
        return out.reshape(-1, E)
    idx = out.reshape(-1, out.shape[-1]).astype(np.int64)
    member = np.zeros((idx.shape[0], E), np.bool_)
    np.put_along_axis(member, idx, True, axis=-1)
    return member


def _group_near_tie(cfg: Workload, z: np.ndarray, mine: np.ndarray, theirs: np.ndarray) -> bool:
    """Group-limited routing where the two results kept different groups whose group scores
    (sum of the top ``topk / group_topk`` of ``z``) agree to 1e-5: the same near-tie as between
    experts, one level up (XLA's reference on the GPU may sum a group in another order)."""
    G, g = cfg.options.get("num_groups"), cfg.options.get("group_topk")
    if not G or not g or G <= 0 or g <= 0:
        return False
    m = cfg.topk // g
    groups = z.reshape(G, -1)
    score = np.sort(groups, axis=-1)[:, ::-1][:, :m].sum(-1)
    kept_mine = mine.reshape(G, -1).any(-1)
    kept_theirs = theirs.reshape(G, -1).any(-1)
    differ = kept_mine ^ kept_theirs
    if not differ.any():
        return False
    gs = score[differ]
    return bool(np.isclose(gs.min(), gs.max(), rtol=1e-5, atol=1e-7))


def verify_route(
    cfg: Workload,
    logits: jax.Array,
    bias: jax.Array | None,
    fused: tuple[Any, Any],
    ref: tuple[Any, Any],
    *,
    max_flip_fraction: float = 1e-3,
) -> list[str]:
    """Compares a fused routing result with the reference's; returns a list of problems.

    ``fused`` / ``ref`` are ``(values, routing)`` as the API returns them: compact weights
    [T, k] or probs [T, E], and indices [T, k] or a bool map [T, E]. Indices must be equal slot
    by slot. The one excuse is a near-tie: a row may differ only among experts whose reference
    selection scores agree to 1e-5 (ulp-level differences between the kernel's exp and XLA's
    can order those either way), and at most ``max_flip_fraction`` of the rows may. Values
    must agree within ``RTOL`` of their dtype on every other row.
    """
    problems: list[str] = []
    vals, routing = (np.asarray(a) for a in fused)
    ref_vals, ref_routing = (np.asarray(a) for a in ref)
    E = cfg.E
    if routing.shape != ref_routing.shape or routing.dtype != ref_routing.dtype:
        return [f"routing output {routing.dtype}{routing.shape} != reference "
                f"{ref_routing.dtype}{ref_routing.shape}"]
    if vals.shape != ref_vals.shape or vals.dtype != ref_vals.dtype:
        return [f"values {vals.dtype}{vals.shape} != reference {ref_vals.dtype}{ref_vals.shape}"]

    if routing.dtype != np.bool_:
        idx = routing.reshape(-1, routing.shape[-1]).astype(np.int64)
        if not ((idx >= 0) & (idx < E)).all():
            problems.append("index out of range [0, E)")
        if (np.sort(idx, axis=-1)[:, 1:] == np.sort(idx, axis=-1)[:, :-1]).any():
            problems.append("repeated index within a row")
        bad_rows = np.nonzero((routing != ref_routing).reshape(len(idx), -1).any(-1))[0]
    else:
        bad_rows = np.nonzero((routing != ref_routing).reshape(-1, E).any(-1))[0]

    rows = int(np.prod(routing.shape[:-1], dtype=np.int64))
    if bad_rows.size:
        z = selection_scores(cfg, logits, bias).reshape(-1, E).astype(np.float64)
        mine, theirs = _selected(routing, E), _selected(ref_routing, E)
        for r in bad_rows:
            # Experts on either side of the disagreement (set difference, or a swapped order).
            diff = mine[r] ^ theirs[r]
            if not diff.any():  # same set, other order: the swapped slots
                a = routing.reshape(rows, -1)[r]
                b = ref_routing.reshape(rows, -1)[r]
                diff = np.zeros(E, np.bool_)
                diff[a[a != b]] = True
                diff[b[a != b]] = True
            zs = z[r, diff]
            if _group_near_tie(cfg, z[r], mine[r], theirs[r]):
                continue
            if not np.isclose(zs.min(), zs.max(), rtol=1e-5, atol=1e-7):
                ids = np.nonzero(diff)[0]
                problems.append(
                    f"row {r}: routing differs from the reference beyond a near-tie "
                    f"({ids.size} experts, e.g. {ids[:4].tolist()} with scores "
                    f"{np.round(zs[:4], 6).tolist()})")
                break
        if bad_rows.size > max(1, max_flip_fraction * rows):
            problems.append(f"{bad_rows.size} of {rows} rows flipped near-ties (too many)")

    keep = np.ones(rows, np.bool_)
    keep[bad_rows] = False
    a = vals.reshape(rows, -1)[keep].astype(np.float32)
    b = ref_vals.reshape(rows, -1)[keep].astype(np.float32)
    rtol = RTOL[np.dtype(vals.dtype)]
    if not np.allclose(a, b, rtol=rtol, atol=rtol * 1e-3, equal_nan=True):
        err = np.abs(a - b) / (np.abs(b) + rtol * 1e-3)
        problems.append(f"values differ: max relative error {float(np.nanmax(err)):.3g} "
                        f"> rtol {rtol:g}")
    return problems


__all__ = ["Workload", "WORKLOADS", "RTOL", "get", "make_inputs", "selection_scores",
           "verify_route"]


def route_fn(cfg: Workload, mode: str, fused: bool) -> Callable[[jax.Array, Any], tuple]:
    """``f(logits, bias) -> (values, routing)`` for one mode, fused FFI or reference."""
    opts = cfg.options
    if mode == "compact":
        if fused:
            return lambda x, b: jr.route_topk(x, cfg.topk, expert_bias=b,
                                              implementation="ffi", **opts)
        return lambda x, b: reference.route_topk(x, cfg.topk, expert_bias=b, **opts)
    extra = {"topk_indices_dtype": jnp.int32} if mode == "dense" else {}
    if fused:
        return lambda x, b: jr.fused_topk_with_score_function(
            x, cfg.topk, expert_bias=b, implementation="ffi", **extra, **opts)
    return lambda x, b: reference.fused_topk_with_score_function(
        x, cfg.topk, expert_bias=b, **extra, **opts)


def grad_fn(f: Callable) -> Callable:
    """d/d logits of ``sum(values * r)``."""

    def loss(x, b, r):
        values, _ = f(x, b)
        return jnp.sum(values.astype(jnp.float32) * r)

    return jax.grad(loss)
