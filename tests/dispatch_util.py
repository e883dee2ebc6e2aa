"""Host (numpy) oracles and inputs for the dispatch tests (docs/semantics.md#dispatch).

The oracles are written from the definition, independently of ``jax_router.reference``: the
plan by walking the flat (token, slot) entries in order with a counter per expert, and the
combine as float32 numpy arithmetic in slot order (numpy never fuses a multiply-add, so this
is the kernels' rounding exactly).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def plan_oracle(idx: np.ndarray, E: int, capacity: int | None):
    """(tokens_per_expert, positions, source) of ``idx`` by definition."""
    flat = np.asarray(idx).reshape(-1).astype(np.int64)
    n = flat.size
    valid = (flat >= 0) & (flat < E)
    tpe = np.bincount(flat[valid], minlength=E).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(tpe)[:-1]]) if capacity is None else (
        np.arange(E) * capacity)
    rank = np.zeros(E, np.int64)
    positions = np.full(n, -1, np.int32)
    R = n if capacity is None else E * capacity
    source = np.full(R, -1, np.int32)
    for i in range(n):
        if not valid[i]:
            continue
        e = flat[i]
        r = rank[e]
        rank[e] += 1
        if capacity is not None and r >= capacity:
            continue
        positions[i] = starts[e] + r
        source[starts[e] + r] = i
    return tpe, positions.reshape(np.shape(idx)), source


def plan_oracle_sorted(idx: np.ndarray, E: int, capacity: int | None):
    """plan_oracle by a stable sort instead of a loop over the entries (for millions of them)."""
    flat = np.asarray(idx).reshape(-1).astype(np.int64)
    n = flat.size
    key = np.where((flat >= 0) & (flat < E), flat, E)  # dropped ids sort last
    order = np.argsort(key, kind="stable")  # the entries in buffer order
    sorted_key = key[order]
    tpe = np.bincount(key, minlength=E + 1)[:E]
    first = np.concatenate([[0], np.cumsum(tpe)])  # first[E]: where the dropped ones begin
    rank = np.arange(n) - first[sorted_key]  # each entry's rank within its expert
    keep = (sorted_key < E) & (True if capacity is None else rank < capacity)
    row = np.arange(n) if capacity is None else sorted_key * capacity + rank
    positions = np.full(n, -1, np.int32)
    positions[order[keep]] = row[keep]
    source = np.full(n if capacity is None else E * capacity, -1, np.int32)
    source[row[keep]] = order[keep]
    return tpe.astype(np.int32), positions.reshape(np.shape(idx)), source


def permute_oracle(x: np.ndarray, source: np.ndarray, topk: int, weights=None) -> np.ndarray:
    """rows[r] = x[source[r] // topk] (times the weight, in float32), 0 outside [0, T * k)."""
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    n = x2.shape[0] * topk
    out = np.zeros((source.size, H), x.dtype)
    for r, s in enumerate(source):
        if 0 <= s < n:
            v = x2[s // topk]
            if weights is not None:
                v = (F32(np.asarray(weights, F32).reshape(-1)[s]) * v.astype(F32)).astype(x.dtype)
            out[r] = v
    return out


def unpermute_oracle(rows: np.ndarray, positions: np.ndarray, weights=None) -> np.ndarray:
    """out[t] = sum_j w[t, j] * rows[positions[t, j]] in float32, slot order, from +0."""
    k = positions.shape[-1]
    pos = positions.reshape(-1, k)
    H = rows.shape[1]
    w = (np.ones(pos.shape, F32) if weights is None
         else np.asarray(weights).astype(F32).reshape(-1, k))
    acc = np.zeros((pos.shape[0], H), F32)
    rf = rows.astype(F32)
    for j in range(k):
        p = pos[:, j]
        ok = (p >= 0) & (p < rows.shape[0])
        term = w[:, j, None] * rf[np.where(ok, p, 0)]
        acc = np.where(ok[:, None], acc + term, acc)
    return acc.astype(rows.dtype).reshape(positions.shape[:-1] + (H,))


def random_ids(rng: np.random.Generator, shape, E: int, kind: str = "uniform") -> np.ndarray:
    """Expert ids of a given load pattern (int64; the caller casts)."""
    if kind == "uniform":
        return rng.integers(0, E, shape)
    if kind == "skewed":  # one expert takes everything
        return np.full(shape, E // 2)
    if kind == "zipf":  # a few hot experts, many empty ones
        return np.minimum(rng.zipf(1.5, shape) - 1, E - 1)
    if kind == "invalid":  # -1, E, and far outside, among valid ids
        ids = rng.integers(0, E, shape)
        u = rng.random(shape)
        ids[u < 0.1] = -1
        ids[(u >= 0.1) & (u < 0.2)] = E
        ids[(u >= 0.2) & (u < 0.25)] = 30000  # fits int16
        ids[(u >= 0.25) & (u < 0.3)] = -30000
        return ids
    raise ValueError(kind)
