"""Named MoE router configurations of real models: the one table the demo and benchmarks share.

Each ``Workload`` holds the number of experts ``E``, ``topk`` and the keyword arguments of
``jax_router.route_topk`` / ``fused_topk_with_score_function`` except the bias array itself:
``has_bias`` says whether the model routes with a selection-only ``expert_bias`` [E], which
``make_inputs`` draws.

Sources (see /work/shared/notes/peers-and-workloads.md §3): MaxText model configs
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
from typing import Any

import jax
import jax.numpy as jnp


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


__all__ = ["Workload", "WORKLOADS", "get", "make_inputs"]
