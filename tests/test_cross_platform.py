"""docs/semantics.md#numerics: the CPU and the CUDA kernels give bit-identical outputs for the same inputs
and options (indices, maps, weights, probs, aux scores, quantile balancing's cutoffs and
histograms, and gradients).

The inputs are built once on the host (numpy): random rows, plus hard rows scattered among them
(near-zero and subnormal-scale values, rows whose sigmoid / softplus / softmax results are
subnormal, exact ties, saturated values, NaN and +-inf, +-0). Each configuration goes through
one jitted program on a CPU device (the C++ kernels) and the same program on the GPU (the CUDA
kernels); every output must have the same bits, NaN payloads included.

Runs only where there is a GPU (the gpu marker: skipped elsewhere, an error under
--require-gpu, so a GPU run cannot pass it by skipping).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from . import impls
from .util import FLOAT_DTYPES, SCORE_CONFIGS, SCORE_IDS

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cpu_and_cuda():
    """The two kernel implementations to compare. The gpu marker has already skipped this
    module where there is no GPU; here a missing one can only be an error."""
    pair = impls.get("cpu"), impls.get("cuda")
    missing = [f"{name}: {impls.missing_reason(name)}"
               for name, found in zip(("cpu", "cuda"), pair) if found is None]
    if missing:
        pytest.fail("cross-platform test needs both kernel implementations; " + "; ".join(missing),
                    pytrace=False)
    return pair


# ---- inputs ------------------------------------------------------------------------------

F32 = np.float32
NAN, INF = F32(np.nan), F32(np.inf)


def hard_rows(E: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Rows (float32 [R, E]) that stress the numerics, with a label for each."""
    rows, labels = [], []

    def add(label, row):
        rows.append(np.asarray(row, F32).reshape(E))
        labels.append(label)

    normal = lambda: rng.standard_normal(E).astype(F32)
    sign = lambda: rng.choice(np.array([-1.0, 1.0], F32), E)
    for scale in (1e-3, 1e-6, 1e-30, 1e-39, 1e-44):
        # near zero; 1e-39 and 1e-44 are float32 subnormals themselves (bf16 keeps them too)
        add(f"near-zero x{scale:g}", scale * normal())
    add("+-0", np.where(rng.random(E) < 0.5, F32(0.0), F32(-0.0)))
    for _ in range(4):
        # sigmoid / softplus of these are subnormal (or 0): exp(-87.3) is the smallest normal
        add("subnormal-scale [-122,-78]", rng.uniform(-122, -78, E))
    add("subnormal-scale [-104,-87]", rng.uniform(-104, -87, E))
    for top in (0.0, 30.0, 88.0):
        # pre-softmax: one large logit, the rest 80..104 below it, so their softmax is subnormal
        x = top - rng.uniform(80, 104, E)
        x[rng.integers(E)] = top
        add(f"one at {top:g}, rest subnormal after softmax", x)
    x = np.full(E, -1e30, F32)
    x[rng.integers(E)] = 1e30
    add("one huge, rest hugely negative", x)
    for value in (0.5, 0.0, -3.0, 7.25):
        add(f"constant {value:g} (all tied)", np.full(E, value))
    for _ in range(2):
        add("integer grid (ties)", rng.integers(-3, 4, E))
    x = normal()
    x[rng.random(E) < 0.5] = x.max()
    add("half tied at the maximum", x)
    for big in (30.0, 100.0, 1e30, 3e38):
        # saturated: sigmoid(+-30) rounds to 1 / 0-ish, group sums of 3e38 overflow
        add(f"+-{big:g}", big * sign())
        x = normal()
        pick = rng.random(E) < 0.3
        x[pick] = big * sign()[pick]
        add(f"normal with +-{big:g}", x)
    add("all NaN", np.full(E, NAN))
    add("all -inf", np.full(E, -INF))
    add("all +inf", np.full(E, INF))
    add("NaN / -inf", np.where(np.arange(E) % 2 == 0, NAN, -INF))
    add("+inf / -inf", np.where(np.arange(E) % 3 == 0, INF, -INF))
    add("one number among NaN", np.where(np.arange(E) == E - 1, F32(1.0), NAN))
    for _ in range(4):
        x = normal()
        u = rng.random(E)
        x = np.where(u < 0.15, NAN, x)
        x = np.where((u >= 0.15) & (u < 0.25), INF, x)
        x = np.where((u >= 0.25) & (u < 0.35), -INF, x)
        add("NaN / +-inf among numbers", x)
    for _ in range(3):
        # magnitudes from subnormal to near overflow in one row
        add("mixed magnitudes 1e-45..1e38", sign() * 10.0 ** rng.uniform(-45, 38, E))
    # scores packed closer than any approximate screen could tell apart: candidates, group
    # boundaries and the threshold all among near-ties
    for spread in (1e-4, 1e-3, 4e-3, 3e-2):
        add(f"clustered +-{spread:g}", rng.uniform(-2, 2) + spread * normal())
    for period in (32, 9, 5):
        # groups of `period` experts (DeepSeek-V3's 32, the grouped test shape's 9) that repeat
        # one pattern to within 1e-3: group scores tie or nearly tie
        base = np.resize(normal()[:period], E)
        for spread in (0.0, 1e-4, 1e-3):
            add(f"groups repeating a pattern of {period} +-{spread:g}", base + spread * normal())
    x = normal()
    x[: E // 2] = np.nextafter(F32(0.6), F32(1.0)) * np.ones(E // 2, F32)
    x[E // 4: E // 2] = F32(0.6)
    add("one ulp apart at the top", x)
    return np.stack(rows), labels


def make_logits(E: int, seed: int, dtype, random_rows: int) -> tuple[np.ndarray, list[str]]:
    """Random rows with the hard rows at random positions, in the logits dtype (host array)."""
    rng = np.random.default_rng(seed)
    scales = rng.choice(np.array([0.1, 2.0, 2.0, 2.0, 10.0], F32), (random_rows, 1))
    rand = (scales * rng.standard_normal((random_rows, E))).astype(F32)
    hard, hard_labels = hard_rows(E, rng)
    x = np.concatenate([rand, hard])
    labels = [f"random x{s:g}" for s in scales[:, 0]] + hard_labels
    order = rng.permutation(len(x))
    with np.errstate(over="ignore"):  # 1e30 and 3e38 become inf in float16: intended
        x = x[order].astype(jnp.dtype(dtype))
    return x, [labels[i] for i in order]


def near_tie_rows(E: int, bias: np.ndarray, rng: np.random.Generator, period: int) -> np.ndarray:
    """Sigmoid rows whose selection scores sigmoid(x) + bias repeat one pattern every `period`
    experts (tied or nearly tied group scores) or cluster around one value, to within 1e-5 ..
    1e-3: x = logit(target - bias), so that the bias cannot pull the near-ties apart."""
    b = np.asarray(bias, np.float64)
    b = np.where(np.isfinite(b), b, 0.0)
    rows = []
    for spread in (0.0, 1e-5, 1e-4, 1e-3):
        pattern = np.resize(rng.uniform(0.3, 0.7, period), E)
        rows.append(pattern + spread * rng.standard_normal(E))
        rows.append(0.5 + spread * rng.standard_normal(E))
    # sigmoid(x) = row - bias, clipped into sigmoid's range (a few experts leave the pattern)
    want = np.clip(np.stack(rows) - b, 1e-3, 1 - 1e-3)
    return np.log(want / (1 - want)).astype(F32)


def make_bias(E: int, seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed + 7)
    b = (0.1 * rng.standard_normal(E)).astype(F32)
    if kind == "ties":  # a coarse grid: many experts get the same bias
        b = np.round(b * 20) / 20
    elif kind == "special":
        b[1::5], b[2::7], b[3::11] = NAN, INF, -INF
    elif kind == "bf16":
        b = b.astype(jnp.bfloat16)
    return b


# ---- comparison --------------------------------------------------------------------------

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _show(v, u):
    return f"{str(v)} (0x{int(u):0{2 * v.dtype.itemsize}x})"


def bit_differences(name, a, b, logits, labels, max_rows=4) -> str | None:
    """None when `a` (CPU) and `b` (CUDA) have equal bits, else a report of the rows that
    differ: how many, and the first few with their inputs."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{name}: cpu {a.dtype}{list(a.shape)} vs cuda {b.dtype}{list(b.shape)}"
    rows = a.shape[0]
    ua = np.ascontiguousarray(a).view(UINT[a.dtype.itemsize]).reshape(rows, -1)
    ub = np.ascontiguousarray(b).view(UINT[b.dtype.itemsize]).reshape(rows, -1)
    a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
    differ = ua != ub
    bad = np.nonzero(differ.any(axis=1))[0]
    if bad.size == 0:
        return None
    lines = [f"{name}: {bad.size} of {rows} rows differ in their bits "
             f"({np.count_nonzero(differ)} elements)"]
    x2 = logits.reshape(rows, -1)
    with np.printoptions(threshold=48, edgeitems=8, precision=8, linewidth=110):
        for r in bad[:max_rows]:
            cols = np.nonzero(differ[r])[0]
            lines.append(f"  row {r} [{labels[r]}]: {cols.size} elements differ, columns "
                         f"{cols[:12].tolist()}{' ...' if cols.size > 12 else ''}")
            for c in cols[:4]:
                at = f", logit {str(x2[r, c])}" if a2.shape[1] == x2.shape[1] else ""
                lines.append(f"    [{c}] cpu {_show(a2[r, c], ua[r, c])}  "
                             f"cuda {_show(b2[r, c], ub[r, c])}{at}")
            if a2.shape[1] != x2.shape[1]:  # [T, k] outputs: the whole slots
                lines.append(f"    cpu  {a2[r]}\n    cuda {b2[r]}")
            lines.append(f"    logits {x2[r]}")
    return "\n".join(lines)


def assert_same_bits(cpu_out: dict, cuda_out: dict, logits, labels):
    assert cpu_out.keys() == cuda_out.keys()
    reports = [bit_differences(k, cpu_out[k], cuda_out[k], logits, labels) for k in cpu_out]
    reports = [r for r in reports if r]
    assert not reports, ("CPU and CUDA kernels disagree (docs/semantics.md#numerics: bit-identical):\n"
                         + "\n".join(reports))


def run_on_both(pair, make_program, *args):
    """make_program(impl), jitted, on each platform, the same host inputs put on its device."""
    return [jax.tree.map(np.asarray, impl.jit(make_program(impl))(*args)) for impl in pair]


def compact_program(topk, kw, index_dtype):
    """make_program for route_topk's compact weights and indices and the gradient (which reads
    the residual the forward saved); inputs (x, bias, cot)."""

    def make(impl):
        def program(x, bias, cot):
            route = lambda x: impl.route_topk(x, topk, index_dtype=index_dtype, expert_bias=bias,
                                              **kw)
            out = {}
            out["weights"], out["indices"] = route(x)
            out["grad"] = jax.vjp(lambda x: route(x)[0], x)[1](cot)[0]
            return out

        return program

    return make


def compact_bits_equal(pair, topk, kw, index_dtype, x, bias, cot, labels):
    """compact_program on both platforms, compared bit for bit; the outputs must not be all zero
    (a comparison of nothing proves nothing). Returns the CPU's outputs."""
    cpu_out, cuda_out = run_on_both(pair, compact_program(topk, kw, index_dtype), x, bias, cot)
    assert np.count_nonzero(cpu_out["weights"]) > 0
    assert np.count_nonzero(np.asarray(cpu_out["grad"], F32)) > 0
    assert_same_bits(cpu_out, cuda_out, x, labels)
    return cpu_out


# ---- routing -----------------------------------------------------------------------------

# (id, E, topk, groups): odd and large E, topk near E, DeepSeek-V3's groups and an odd grouped one
SHAPES = [
    ("E8-k2", 8, 2, None),
    ("E37-k5", 37, 5, None),
    ("E37-k36", 37, 36, None),
    ("E45-k6-g5-2", 45, 6, (5, 2)),
    ("E96-k40", 96, 40, None),
    ("E128-k8", 128, 8, None),
    ("E256-k8-g8-4", 256, 8, (8, 4)),
    ("E384-k8", 384, 8, None),
    ("E2048-k8", 2048, 8, None),
]
BIAS_KINDS = ("random", "ties", "special", "bf16")


def routing_program(topk, kw, index_dtype):
    """make_program for every output of the router, forward and backward, in one program."""

    def make(impl):
        def program(x, bias, cot_k, cot_e):
            kw_b = dict(kw, expert_bias=bias)
            route = lambda x: impl.route_topk(x, topk, index_dtype=index_dtype, **kw_b)
            fused = lambda x, **extra: impl.fused_topk_with_score_function(x, topk, **extra,
                                                                           **kw_b)
            out = {}
            out["compact weights"], out["compact indices"] = route(x)
            out["bytemap probs"], out["bytemap map"] = fused(x)
            out["bitmap_u8 probs"], out["bitmap_u8 map"] = fused(x, routing_map_format="bitmap_u8")
            out["dense probs"], out["dense indices"] = fused(x, topk_indices_dtype=index_dtype)
            # the backward of each mode, with the same random cotangent on both platforms
            out["compact grad"] = jax.vjp(lambda x: route(x)[0], x)[1](cot_k)[0]
            out["dense grad"] = jax.vjp(
                lambda x: fused(x, topk_indices_dtype=index_dtype)[0], x)[1](cot_e)[0]
            out["bytemap grad"] = jax.vjp(lambda x: fused(x)[0], x)[1](cot_e)[0]
            return out

        return program

    return make


ROUTE_CASES = [(s, c) for s in range(len(SHAPES)) for c in range(len(SCORE_CONFIGS))]


@pytest.mark.parametrize("shape,config", ROUTE_CASES,
                         ids=[f"{SHAPES[s][0]}-{SCORE_IDS[c]}" for s, c in ROUTE_CASES])
def test_routing_bits_equal(cpu_and_cuda, shape, config):
    name, E, topk, groups = SHAPES[shape]
    score, pre, with_bias = SCORE_CONFIGS[config]
    # dtypes, index dtypes, scaling and bias kinds rotate over the grid, so that each shape
    # meets every logits dtype and each score configuration every bias kind
    dtype = FLOAT_DTYPES[(shape + config) % 3]
    index_dtype = jnp.int16 if (shape + config) % 2 else jnp.int32
    kw = dict(score_function=score, use_pre_softmax=pre,
              scaling_factor=2.5 if groups else (None, 1.7)[config % 2])
    if groups:
        kw["num_groups"], kw["group_topk"] = groups
    seed = 1000 * shape + config
    bias = make_bias(E, seed, BIAS_KINDS[(shape + config // 2) % 4]) if with_bias else None
    x, labels = make_logits(E, seed, dtype, random_rows=2048 if E <= 512 else 1024)
    rng = np.random.default_rng(seed + 1)
    if score == "sigmoid" and bias is not None:
        extra = near_tie_rows(E, np.asarray(bias, F32), rng, groups and E // groups[0] or 32)
        x = np.concatenate([x, extra.astype(x.dtype)])
        labels = labels + ["scores patterned or clustered given the bias"] * len(extra)
    cot_k = rng.standard_normal((x.shape[0], topk)).astype(F32)
    cot_e = rng.standard_normal(x.shape).astype(jnp.dtype(dtype))
    cpu_out, cuda_out = run_on_both(cpu_and_cuda, routing_program(topk, kw, index_dtype),
                                    x, bias, cot_k, cot_e)
    # the comparison would prove nothing if the outputs were empty or all zero
    assert np.count_nonzero(cpu_out["compact weights"]) > 0
    assert np.count_nonzero(np.asarray(cpu_out["compact grad"], F32)) > 0
    assert_same_bits(cpu_out, cuda_out, x, labels)


# ---- aux scores --------------------------------------------------------------------------

# (E, topk): odd and large E; on CUDA the register kernels (E <= 1024, small and large k) and
# the general one (E > 1024)
AUX_SHAPES = [(8, 2), (37, 5), (256, 20), (1024, 16), (1025, 3), (2048, 64)]
AUX_CASES = [(s, fn) for s in range(len(AUX_SHAPES)) for fn in ("softmax", "sigmoid",
                                                                "sqrtsoftplus")]


def aux_program(topk, fn):
    """make_program for the aux-score op's outputs (both map formats) and its gradient."""

    def make(impl):
        def program(x, cot):
            aux = lambda x, fmt="bytemap": impl.fused_compute_score_for_moe_aux_loss(x, topk, fn,
                                                                                     fmt)
            out = {}
            out["bytemap map"], out["scores"] = aux(x)
            out["bitmap_u8 map"], out["bitmap_u8 scores"] = aux(x, "bitmap_u8")
            out["scores grad"] = jax.vjp(lambda x: aux(x)[1], x)[1](cot)[0]
            return out

        return program

    return make


@pytest.mark.parametrize("shape,fn", AUX_CASES,
                         ids=[f"E{AUX_SHAPES[s][0]}-k{AUX_SHAPES[s][1]}-{fn}"
                              for s, fn in AUX_CASES])
def test_aux_scores_bits_equal(cpu_and_cuda, shape, fn):
    E, topk = AUX_SHAPES[shape]
    dtype = FLOAT_DTYPES[(shape + len(fn)) % 3]
    seed = 5000 + 10 * shape + len(fn)
    x, labels = make_logits(E, seed, dtype, random_rows=2048 if E <= 512 else 1024)
    cot = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(F32)
    cpu_out, cuda_out = run_on_both(cpu_and_cuda, aux_program(topk, fn), x, cot)
    assert np.count_nonzero(cpu_out["scores"]) > 0
    assert np.count_nonzero(np.asarray(cpu_out["scores grad"], F32)) > 0
    assert_same_bits(cpu_out, cuda_out, x, labels)


# ---- quantile balancing ------------------------------------------------------------------

# (E, topk): on CUDA the fast kernel's layouts (E <= 1024, topk + 1 <= 32) and the general
# kernel (topk + 1 > 32, E > 1024); topk + 1 == E
QB_SHAPES = [(8, 7), (37, 5), (130, 8), (896, 16), (1024, 32), (2048, 8)]


def qb_program(topk, num_bins, index_dtype):
    def make(impl):
        def program(x, bias, bounds, hist, cot):
            qb = lambda x: impl.route_topk_qb(x, topk, bias, bounds, num_bins, hist,
                                              scaling_factor=1.5, index_dtype=index_dtype)
            out = {}
            out["weights"], out["indices"], out["cutoff"], out["histogram"] = qb(x)
            probs, out["map"], out["map cutoff"], out["map histogram"] = (
                impl.fused_topk_with_score_function_qb(x, topk, bias, bounds, num_bins, hist))
            out["probs"] = probs
            out["grad"] = jax.vjp(lambda x: qb(x)[0], x)[1](cot)[0]
            return out

        return program

    return make


@pytest.mark.parametrize("shape", range(len(QB_SHAPES)),
                         ids=[f"E{E}-k{k}" for E, k in QB_SHAPES])
def test_qb_bits_equal(cpu_and_cuda, shape):
    E, topk = QB_SHAPES[shape]
    dtype = FLOAT_DTYPES[shape % 3]
    seed = 9000 + shape
    x, labels = make_logits(E, seed, dtype, random_rows=2048 if E <= 512 else 1024)
    bias = make_bias(E, seed, BIAS_KINDS[shape % 4])
    rng = np.random.default_rng(seed + 1)
    bounds = np.array([-1.5, 1.25], F32)
    hist = rng.integers(0, 5, (E, 97)).astype(np.int32)
    cot = rng.standard_normal((x.shape[0], topk)).astype(F32)
    index_dtype = jnp.int16 if shape % 2 else jnp.int32
    cpu_out, cuda_out = run_on_both(cpu_and_cuda, qb_program(topk, 97, index_dtype),
                                    x, bias, bounds, hist, cot)
    assert np.count_nonzero(cpu_out["weights"]) > 0
    assert np.count_nonzero(np.asarray(cpu_out["grad"], F32)) > 0
    for name in ("histogram", "map histogram"):  # [E, bins]: compared whole, not by token row
        h_cpu, h_cuda = cpu_out.pop(name), cuda_out.pop(name)
        assert (h_cpu.sum(axis=1) == hist.sum(axis=1) + x.shape[0]).all()
        assert np.array_equal(h_cpu, h_cuda), (
            f"{name}: {np.count_nonzero(h_cpu != h_cuda)} of {h_cpu.size} counts differ")
    assert_same_bits(cpu_out, cuda_out, x, labels)
