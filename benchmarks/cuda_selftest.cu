// Standalone check and micro-benchmark of the CUDA router kernels, without JAX.
//
//   nvcc -std=c++17 -O2 -arch=sm_90 --expt-relaxed-constexpr -Iffi benchmarks/cuda_selftest.cu \
//        -o /tmp/selftest && /tmp/selftest [--bench]
//
// Compares every forward output (probs, bytemap / bitmap, weights, indices, act) and the
// backward against a plain host implementation of SPEC §3-4 built from ffi/router.h, on random,
// tied and non-finite inputs, for the fast and the general paths. Outputs are poisoned first
// so unwritten elements show. --bench times the forward / backward with CUDA events over
// rotating input sets (more bytes than L2) and prints achieved bandwidth.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "router_launch.cuh"

using namespace jax_router;
using namespace jax_router::cuda;

#define CK(x)                                                                            \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                      \
    }                                                                                    \
  } while (0)

static uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
static float bf2f(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static uint16_t f2h(float f) {
  __half h = __float2half_rn(f);
  return *reinterpret_cast<uint16_t*>(&h);
}
static float h2f(uint16_t v) { return __half2float(*reinterpret_cast<__half*>(&v)); }

struct Cfg {
  std::string name;
  int E, k;
  ScoreFn fn;
  bool pre = false;
  int G = 0, gk = 0;
  bool bias = false;
  float scaling = 1.0f;
};

// Host reference of one row (SPEC §3).
struct RowRef {
  std::vector<int> idx;
  std::vector<float> w, act;
};

static RowRef HostRow(const Cfg& c, const float* x, const float* b) {
  const int E = c.E, k = c.k;
  std::vector<float> s(E), z(E);
  float mx = -INFINITY, sum = 0.0f;
  if (c.fn == ScoreFn::kSoftmax && c.pre) {
    for (int i = 0; i < E; ++i) mx = std::fmax(mx, x[i]);
    for (int i = 0; i < E; ++i) sum += std::exp(x[i] - mx);
  }
  for (int i = 0; i < E; ++i) {
    if (c.fn == ScoreFn::kSoftmax)
      s[i] = c.pre ? std::exp(x[i] - mx) / sum : x[i];
    else
      s[i] = activation(c.fn, x[i]);
    z[i] = (c.fn != ScoreFn::kSoftmax && b) ? s[i] + b[i] : s[i];
  }
  std::vector<uint32_t> key(E);
  for (int i = 0; i < E; ++i) key[i] = order_key(z[i]);
  if (c.gk > 0) {
    const int gs = E / c.G, m = k / c.gk;
    std::vector<uint64_t> gkeys;
    for (int g = 0; g < c.G; ++g) {
      std::vector<uint32_t> kk(key.begin() + g * gs, key.begin() + (g + 1) * gs);
      std::sort(kk.begin(), kk.end(), std::greater<uint32_t>());
      float acc = 0.0f;
      for (int q = 0; q < m; ++q) acc = q == 0 ? order_key_value(kk[0]) : acc + order_key_value(kk[q]);
      gkeys.push_back(slot_key(order_key(acc), g));
    }
    std::sort(gkeys.begin(), gkeys.end(), std::greater<uint64_t>());
    std::vector<char> kept(c.G, 0);
    for (int q = 0; q < c.gk; ++q) kept[slot_expert(gkeys[q])] = 1;
    for (int i = 0; i < E; ++i)
      if (!kept[i / gs]) key[i] = kExcludedKey;
  }
  std::vector<uint64_t> sk(E);
  for (int i = 0; i < E; ++i) sk[i] = slot_key(key[i], i);
  std::partial_sort(sk.begin(), sk.begin() + k, sk.end(), std::greater<uint64_t>());
  RowRef r;
  std::vector<float> u(k);
  for (int q = 0; q < k; ++q) {
    r.idx.push_back(static_cast<int>(slot_expert(sk[q])));
  }
  const bool raw = c.fn == ScoreFn::kSoftmax && !c.pre;
  float tot = 0.0f;
  for (int q = 0; q < k; ++q) {
    const int e = r.idx[q];
    u[q] = raw ? std::exp(x[e] - x[r.idx[0]]) : s[e];
    tot += u[q];
  }
  for (int q = 0; q < k; ++q) {
    float p;
    if (raw)
      p = u[q] / tot;
    else if (c.fn == ScoreFn::kSoftmax)
      p = u[q];
    else
      p = k > 1 ? u[q] / (tot + kEps) : u[q];
    r.w.push_back(c.scaling * p);
    r.act.push_back(raw ? p : u[q]);
  }
  return r;
}

static bool close(float a, float b, float rtol, float atol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

enum class Fill { kNormal, kZeros, kInts, kNonFinite };

static int g_fail = 0;

static void RunCase(const Cfg& c, int T, Dt dt, It it, Fill fill, bool bitmap, uint64_t seed) {
  const int E = c.E, k = c.k;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> xf(static_cast<size_t>(T) * E);
  for (auto& v : xf) {
    switch (fill) {
      case Fill::kNormal:
        v = nd(rng) * 2.0f;
        break;
      case Fill::kZeros:
        v = 0.0f;
        break;
      case Fill::kInts:
        v = std::round(nd(rng));
        break;
      case Fill::kNonFinite: {
        v = nd(rng);
        const int r = static_cast<int>(rng() % 23);
        if (r == 0) v = NAN;
        if (r == 1) v = INFINITY;
        if (r == 2) v = -INFINITY;
        if (r == 3) v = -0.0f;
      } break;
    }
  }
  // Round to the storage type so host and device see the same logits.
  const size_t es = dt == Dt::kF32 ? 4 : 2;
  std::vector<unsigned char> xs(xf.size() * es);
  for (size_t i = 0; i < xf.size(); ++i) {
    if (dt == Dt::kF32) {
      std::memcpy(&xs[i * 4], &xf[i], 4);
    } else {
      uint16_t h = dt == Dt::kBF16 ? f2bf(xf[i]) : f2h(xf[i]);
      xf[i] = dt == Dt::kBF16 ? bf2f(h) : h2f(h);
      std::memcpy(&xs[i * 2], &h, 2);
    }
  }
  std::vector<float> bias(E);
  for (auto& v : bias) v = fill == Fill::kZeros ? 0.0f : 0.1f * nd(rng);

  void *d_x, *d_probs, *d_map, *d_idx;
  float *d_bias, *d_w, *d_act;
  const size_t mapb = bitmap ? static_cast<size_t>(T) * ((E + 7) / 8) : static_cast<size_t>(T) * E;
  const size_t isz = it == It::kS16 ? 2 : (it == It::kS32 ? 4 : 8);
  CK(cudaMalloc(&d_x, xs.size()));
  CK(cudaMalloc(&d_probs, xs.size()));
  CK(cudaMalloc(&d_map, mapb));
  CK(cudaMalloc(&d_idx, static_cast<size_t>(T) * k * isz));
  CK(cudaMalloc(&d_bias, E * 4));
  CK(cudaMalloc(&d_w, static_cast<size_t>(T) * k * 4));
  CK(cudaMalloc(&d_act, static_cast<size_t>(T) * k * 4));
  CK(cudaMemcpy(d_x, xs.data(), xs.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_bias, bias.data(), E * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(d_probs, 0xFF, xs.size()));
  CK(cudaMemset(d_map, 0xFF, mapb));
  CK(cudaMemset(d_idx, 0xFF, static_cast<size_t>(T) * k * isz));
  CK(cudaMemset(d_w, 0xFF, static_cast<size_t>(T) * k * 4));
  CK(cudaMemset(d_act, 0xFF, static_cast<size_t>(T) * k * 4));

  FwdArgs a;
  a.rows = T;
  a.experts = E;
  a.p = RouteParams{k, c.fn, c.pre, c.gk > 0 ? c.G : 0, c.gk, c.scaling};
  a.logits = d_x;
  a.logits_dt = dt;
  a.bias = c.bias ? d_bias : nullptr;
  a.rows_per_bias = T;
  a.probs = d_probs;
  a.map = d_map;
  a.bitmap = bitmap;
  a.weights = d_w;
  a.indices = d_idx;
  a.index_dt = it;
  a.act = d_act;
  FwdPath path;
  CK(LaunchForward(a, 0, &path));
  CK(cudaDeviceSynchronize());

  std::vector<unsigned char> probs(xs.size()), map(mapb), idxb(static_cast<size_t>(T) * k * isz);
  std::vector<float> w(static_cast<size_t>(T) * k), act(static_cast<size_t>(T) * k);
  CK(cudaMemcpy(probs.data(), d_probs, probs.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(map.data(), d_map, mapb, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(idxb.data(), d_idx, idxb.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(w.data(), d_w, w.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(act.data(), d_act, act.size() * 4, cudaMemcpyDeviceToHost));

  auto gidx = [&](size_t i) -> int64_t {
    if (it == It::kS16) return reinterpret_cast<int16_t*>(idxb.data())[i];
    if (it == It::kS32) return reinterpret_cast<int32_t*>(idxb.data())[i];
    return reinterpret_cast<int64_t*>(idxb.data())[i];
  };
  auto gprob = [&](size_t i) -> float {
    if (dt == Dt::kF32) return reinterpret_cast<float*>(probs.data())[i];
    uint16_t h = reinterpret_cast<uint16_t*>(probs.data())[i];
    return dt == Dt::kBF16 ? bf2f(h) : h2f(h);
  };
  auto rnd = [&](float v) -> float {
    if (dt == Dt::kF32) return v;
    return dt == Dt::kBF16 ? bf2f(f2bf(v)) : h2f(f2h(v));
  };
  const bool nonfinite = fill == Fill::kNonFinite;
  long idx_mis = 0, val_bad = 0, dense_bad = 0, invariant_bad = 0;
  for (int t = 0; t < T; ++t) {
    RowRef r = HostRow(c, &xf[static_cast<size_t>(t) * E], c.bias ? bias.data() : nullptr);
    std::vector<char> seen(E, 0);
    bool row_mis = false;
    for (int q = 0; q < k; ++q) {
      const int64_t e = gidx(static_cast<size_t>(t) * k + q);
      if (e < 0 || e >= E || seen[e]) {
        ++invariant_bad;
        continue;
      }
      seen[e] = 1;
      if (e != r.idx[q]) row_mis = true;
    }
    if (row_mis) {
      ++idx_mis;
      if (idx_mis <= 3) {
        std::printf("    row %d mismatch: gpu", t);
        for (int q = 0; q < k && q < 12; ++q) std::printf(" %lld", (long long)gidx(static_cast<size_t>(t) * k + q));
        std::printf(" | host");
        for (int q = 0; q < k && q < 12; ++q) std::printf(" %d", r.idx[q]);
        std::printf("\n");
      }
      continue;
    }
    for (int q = 0; q < k; ++q) {
      const size_t o = static_cast<size_t>(t) * k + q;
      if (!(close(w[o], r.w[q], 2e-5f, 1e-30f) && close(act[o], r.act[q], 2e-5f, 1e-30f))) {
        if (!nonfinite && val_bad < 3)
          std::printf("    row %d slot %d: w %g vs %g, act %g vs %g\n", t, q, w[o], r.w[q], act[o], r.act[q]);
        ++val_bad;
      }
    }
    // Dense outputs.
    std::vector<float> dense(E, 0.0f);
    for (int q = 0; q < k; ++q) dense[r.idx[q]] = rnd(r.w[q]);
    for (int e = 0; e < E; ++e) {
      const size_t o = static_cast<size_t>(t) * E + e;
      float g = gprob(o);
      if (!close(g, dense[e], 1e-2f, 1e-30f) && !(nonfinite && std::isnan(dense[e]))) ++dense_bad;
      const bool sel = std::find(r.idx.begin(), r.idx.end(), e) != r.idx.end();
      bool m;
      if (bitmap) {
        const size_t nb = (E + 7) / 8;
        m = (map[t * nb + e / 8] >> (e % 8)) & 1;
      } else {
        if (map[o] > 1) ++dense_bad;
        m = map[o] == 1;
      }
      if (m != sel) ++dense_bad;
    }
    if (bitmap && (E % 8)) {
      const size_t nb = (E + 7) / 8;
      if (map[t * nb + nb - 1] >> (E % 8)) ++dense_bad;
    }
  }
  if (nonfinite) val_bad = 0;  // NaN weights may legitimately differ in payload paths
  const bool ok = invariant_bad == 0 && dense_bad == 0 && val_bad == 0 &&
                  (idx_mis == 0 || (fill == Fill::kNonFinite && idx_mis * 50 < T) ||
                   (c.pre && idx_mis * 200 < T));
  const char* dts = dt == Dt::kF32 ? "f32" : (dt == Dt::kBF16 ? "bf16" : "f16");
  const char* fills[] = {"normal", "zeros", "ints", "nonfinite"};
  std::printf("%s %-14s T=%-5d E=%-5d k=%-4d %-4s %-9s %s path=%s idx_mismatch=%ld values_bad=%ld dense_bad=%ld invariant_bad=%ld\n",
              ok ? "PASS" : "FAIL", c.name.c_str(), T, E, k, dts, fills[static_cast<int>(fill)],
              bitmap ? "bitmap" : "bytemap", path == FwdPath::kFast ? "fast" : "general", idx_mis,
              val_bad, dense_bad, invariant_bad);
  if (!ok) ++g_fail;

  // Backward from the GPU's own indices/act: dense (dtype of logits) and compact (f32) grads.
  if (fill == Fill::kNormal || fill == Fill::kInts) {
    for (int dense_grad = 0; dense_grad < 2; ++dense_grad) {
      std::vector<float> g(dense_grad ? static_cast<size_t>(T) * E : static_cast<size_t>(T) * k);
      for (auto& v : g) v = nd(rng);
      std::vector<unsigned char> gs;
      Dt gdt = dense_grad ? dt : Dt::kF32;
      const size_t ges = gdt == Dt::kF32 ? 4 : 2;
      gs.resize(g.size() * ges);
      for (size_t i = 0; i < g.size(); ++i) {
        if (gdt == Dt::kF32) {
          std::memcpy(&gs[i * 4], &g[i], 4);
        } else {
          uint16_t h = gdt == Dt::kBF16 ? f2bf(g[i]) : f2h(g[i]);
          g[i] = gdt == Dt::kBF16 ? bf2f(h) : h2f(h);
          std::memcpy(&gs[i * 2], &h, 2);
        }
      }
      void *d_g, *d_out;
      CK(cudaMalloc(&d_g, gs.size()));
      CK(cudaMalloc(&d_out, xs.size()));
      CK(cudaMemcpy(d_g, gs.data(), gs.size(), cudaMemcpyHostToDevice));
      CK(cudaMemset(d_out, 0xFF, xs.size()));
      BwdArgs b;
      b.rows = T;
      b.experts = E;
      b.p = a.p;
      b.dense_grad = dense_grad;
      b.grad = d_g;
      b.grad_dt = gdt;
      b.indices = d_idx;
      b.index_dt = it;
      b.act = d_act;
      b.logits = d_x;
      b.logits_dt = dt;
      b.grad_logits = d_out;
      b.out_dt = dt;
      CK(LaunchBackward(b, 0));
      CK(cudaDeviceSynchronize());
      std::vector<unsigned char> out(xs.size());
      CK(cudaMemcpy(out.data(), d_out, out.size(), cudaMemcpyDeviceToHost));
      long bad = 0;
      double num = 0, den = 0;
      for (int t = 0; t < T; ++t) {
        std::vector<double> ref(E, 0.0);
        const float* x = &xf[static_cast<size_t>(t) * E];
        std::vector<int> S(k);
        std::vector<double> gh(k), sv(k);
        for (int q = 0; q < k; ++q) {
          S[q] = static_cast<int>(gidx(static_cast<size_t>(t) * k + q));
          gh[q] = c.scaling * (dense_grad ? g[static_cast<size_t>(t) * E + S[q]] : g[static_cast<size_t>(t) * k + q]);
          sv[q] = act[static_cast<size_t>(t) * k + q];
        }
        if (c.fn == ScoreFn::kSoftmax && c.pre) {
          double mx = -INFINITY, sum = 0;
          for (int i = 0; i < E; ++i) mx = std::max(mx, (double)x[i]);
          for (int i = 0; i < E; ++i) sum += std::exp(x[i] - mx);
          double D = 0;
          for (int q = 0; q < k; ++q) D += gh[q] * std::exp(x[S[q]] - mx) / sum;
          for (int i = 0; i < E; ++i) ref[i] = -std::exp(x[i] - mx) / sum * D;
          for (int q = 0; q < k; ++q) ref[S[q]] = std::exp(x[S[q]] - mx) / sum * (gh[q] - D);
        } else if (c.fn == ScoreFn::kSoftmax) {
          double D = 0;
          for (int q = 0; q < k; ++q) D += gh[q] * sv[q];
          for (int q = 0; q < k; ++q) ref[S[q]] = sv[q] * (gh[q] - D);
        } else {
          double A = 0, B = 0;
          for (int q = 0; q < k; ++q) {
            A += sv[q];
            B += gh[q] * sv[q];
          }
          for (int q = 0; q < k; ++q) {
            double ds = k > 1 ? gh[q] / (A + 1e-20) - B / ((A + 1e-20) * (A + 1e-20)) : gh[q];
            ref[S[q]] = ds * activation_grad(c.fn, static_cast<float>(sv[q]));
          }
        }
        for (int i = 0; i < E; ++i) {
          const size_t o = static_cast<size_t>(t) * E + i;
          float v;
          if (dt == Dt::kF32) {
            std::memcpy(&v, &out[o * 4], 4);
          } else {
            uint16_t h;
            std::memcpy(&h, &out[o * 2], 2);
            v = dt == Dt::kBF16 ? bf2f(h) : h2f(h);
          }
          if (std::isnan(v)) ++bad;
          num += (v - ref[i]) * (v - ref[i]);
          den += ref[i] * ref[i];
        }
      }
      const double rel = std::sqrt(num / (den > 0 ? den : 1));
      const double tol = dt == Dt::kF32 ? 1e-5 : 1e-2;
      const bool bok = bad == 0 && rel < tol;
      std::printf("%s   backward %s grad: rel_l2=%.2e nan=%ld\n", bok ? "PASS" : "FAIL",
                  dense_grad ? "dense" : "compact", rel, bad);
      if (!bok) ++g_fail;
      CK(cudaFree(d_g));
      CK(cudaFree(d_out));
    }
  }
  CK(cudaFree(d_x));
  CK(cudaFree(d_probs));
  CK(cudaFree(d_map));
  CK(cudaFree(d_idx));
  CK(cudaFree(d_bias));
  CK(cudaFree(d_w));
  CK(cudaFree(d_act));
}

// ---- benchmark ------------------------------------------------------------------------------

static float TimeIt(const std::function<void(int)>& f, int sets, int iters) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3 * sets; ++i) f(i % sets);
  std::vector<float> ts;
  for (int rep = 0; rep < 7; ++rep) {
    CK(cudaEventRecord(a));
    for (int i = 0; i < iters; ++i) f(i % sets);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms * 1000.0f / iters);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

static void Bench() {
  // Copy ceiling.
  const size_t cb = size_t(1) << 30;
  void *s0, *s1;
  CK(cudaMalloc(&s0, cb));
  CK(cudaMalloc(&s1, cb));
  CK(cudaMemset(s0, 1, cb));
  float us = TimeIt([&](int) { CK(cudaMemcpyAsync(s1, s0, cb, cudaMemcpyDeviceToDevice)); }, 1, 10);
  const double bw = 2.0 * cb / (us * 1e-6) / 1e12;
  std::printf("copy bandwidth %.2f TB/s (1 GiB D2D)\n", bw);
  CK(cudaFree(s0));
  CK(cudaFree(s1));

  std::vector<Cfg> cfgs = {
      {"deepseek-v3", 256, 8, ScoreFn::kSigmoid, false, 8, 4, true, 2.5f},
      {"qwen3", 128, 8, ScoreFn::kSoftmax},
      {"mixtral", 8, 2, ScoreFn::kSoftmax},
      {"kimi-k2", 384, 8, ScoreFn::kSigmoid, false, 0, 0, true, 2.827f},
      {"qwen3-next", 512, 10, ScoreFn::kSoftmax},
      {"large", 896, 16, ScoreFn::kSigmoid, false, 0, 0, true},
  };
  std::printf("%-12s %7s %4s %-8s %9s %9s %7s\n", "config", "T", "dt", "mode", "us", "floor_us",
              "x_floor");
  const char* fcfg = std::getenv("BENCH_CFG");
  const char* fT = std::getenv("BENCH_T");
  const char* fdt = std::getenv("BENCH_DT");
  for (const Cfg& c : cfgs) {
    if (fcfg && c.name != fcfg) continue;
    for (int T : {16384, 65536}) {
      if (fT && T != std::atoi(fT)) continue;
      for (Dt dt : {Dt::kBF16, Dt::kF32}) {
        if (fdt && std::string(fdt) != (dt == Dt::kF32 ? "f32" : "bf16")) continue;
        const size_t es = dt == Dt::kF32 ? 4 : 2;
        const size_t xb = static_cast<size_t>(T) * c.E * es;
        const int sets = static_cast<int>(std::max<size_t>(4, (size_t(200) << 20) / xb + 1));
        std::vector<void*> xs(sets), probs(sets), outs(sets);
        std::vector<float*> ws(sets), acts(sets);
        std::vector<int32_t*> idx(sets);
        float* bias;
        CK(cudaMalloc(&bias, c.E * 4));
        CK(cudaMemset(bias, 0, c.E * 4));
        std::mt19937 rng(1);
        std::normal_distribution<float> nd;
        std::vector<unsigned char> host(xb);
        for (int s = 0; s < sets; ++s) {
          for (size_t i = 0; i < static_cast<size_t>(T) * c.E; ++i) {
            float v = nd(rng);
            if (es == 4) std::memcpy(&host[i * 4], &v, 4);
            else { uint16_t h = f2bf(v); std::memcpy(&host[i * 2], &h, 2); }
          }
          CK(cudaMalloc(&xs[s], xb));
          CK(cudaMemcpy(xs[s], host.data(), xb, cudaMemcpyHostToDevice));
          CK(cudaMalloc(&probs[s], xb));
          CK(cudaMalloc(&outs[s], xb));
          CK(cudaMalloc(&ws[s], static_cast<size_t>(T) * c.k * 4));
          CK(cudaMalloc(&acts[s], static_cast<size_t>(T) * c.k * 4));
          CK(cudaMalloc(&idx[s], static_cast<size_t>(T) * c.k * 4));
        }
        FwdArgs a;
        a.rows = T;
        a.experts = c.E;
        a.p = RouteParams{c.k, c.fn, c.pre, c.gk > 0 ? c.G : 0, c.gk, c.scaling};
        a.logits_dt = dt;
        a.bias = c.bias ? bias : nullptr;
        a.rows_per_bias = T;
        a.index_dt = It::kS32;
        // compact: weights + indices + act (what route_topk's forward writes under grad)
        auto fwd = [&](int s, bool dense) {
          FwdArgs b = a;
          b.logits = xs[s];
          b.weights = dense ? nullptr : ws[s];
          b.indices = idx[s];
          b.act = acts[s];
          b.probs = dense ? probs[s] : nullptr;
          CK(LaunchForward(b, 0));
        };
        for (int s = 0; s < sets; ++s) fwd(s, false);
        CK(cudaDeviceSynchronize());
        const double fl_c = (double(T) * c.E * es + double(T) * c.k * 12) / (bw * 1e12) * 1e6;
        const double fl_d = (2.0 * T * c.E * es + double(T) * c.k * 8) / (bw * 1e12) * 1e6;
        const double fl_b = (double(T) * c.k * 12 + double(T) * c.E * es) / (bw * 1e12) * 1e6;
        float tc = TimeIt([&](int s) { fwd(s, false); }, sets, 200);
        const long long ll = LastFastLaunch().load();
        std::printf("  (fast grid %lld, blocks/SM %lld)\n", ll / 1000, ll % 1000);
        float td = TimeIt([&](int s) { fwd(s, true); }, sets, 200);
        BwdArgs bb;
        bb.rows = T;
        bb.experts = c.E;
        bb.p = a.p;
        bb.dense_grad = false;
        bb.grad_dt = Dt::kF32;
        bb.index_dt = It::kS32;
        bb.logits_dt = dt;
        bb.out_dt = dt;
        float tb = TimeIt(
            [&](int s) {
              BwdArgs q = bb;
              q.grad = ws[s];
              q.indices = idx[s];
              q.act = acts[s];
              q.grad_logits = outs[s];
              CK(LaunchBackward(q, 0));
            },
            sets, 200);
        const char* dts = dt == Dt::kF32 ? "f32" : "bf16";
        std::printf("%-12s %7d %4s %-8s %9.2f %9.2f %7.2f\n", c.name.c_str(), T, dts, "compact", tc, fl_c, tc / fl_c);
        std::printf("%-12s %7d %4s %-8s %9.2f %9.2f %7.2f\n", c.name.c_str(), T, dts, "dense", td, fl_d, td / fl_d);
        std::printf("%-12s %7d %4s %-8s %9.2f %9.2f %7.2f\n", c.name.c_str(), T, dts, "bwd", tb, fl_b, tb / fl_b);
        for (int s = 0; s < sets; ++s) {
          CK(cudaFree(xs[s]));
          CK(cudaFree(probs[s]));
          CK(cudaFree(outs[s]));
          CK(cudaFree(ws[s]));
          CK(cudaFree(acts[s]));
          CK(cudaFree(idx[s]));
        }
        CK(cudaFree(bias));
      }
    }
  }
}

int main(int argc, char** argv) {
  bool bench = false, only_bench = false, small = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--small")) small = true;
    if (!std::strcmp(argv[i], "--bench")) bench = true;
    if (!std::strcmp(argv[i], "--only-bench")) bench = only_bench = true;
  }
  if (!only_bench) {
    const ScoreFn SM = ScoreFn::kSoftmax, SG = ScoreFn::kSigmoid, SP = ScoreFn::kSqrtSoftplus;
    std::vector<Cfg> cfgs = {
        {"deepseek-v3", 256, 8, SG, false, 8, 4, true, 2.5f},
        {"qwen3", 128, 8, SM},
        {"mixtral", 8, 2, SM},
        {"kimi-k2", 384, 8, SG, false, 0, 0, true, 2.827f},
        {"qwen3-next", 512, 10, SM},
        {"large", 896, 16, SG, false, 0, 0, true},
        {"odd-sqrtsp", 130, 7, SP, false, 0, 0, true, 1.5f},
        {"grp160", 160, 6, SG, false, 5, 3, true},
        {"grp64", 64, 4, SP, false, 4, 2, true},
        {"pre64", 64, 4, SM, true},
        {"pre-grp", 256, 8, SM, true, 8, 4},
        {"e1", 1, 1, SG},
        {"e8k8", 8, 8, SM},
        {"e8k1", 8, 1, SG, false, 0, 0, true},
        {"e24k3", 24, 3, SG},
        {"e300k300", 300, 300, SM},
        {"e1000k32", 1000, 32, SG, false, 0, 0, true},
        {"e256k40", 256, 40, SM},
        {"grp-general", 896, 16, SG, false, 8, 4, true},
        {"e4096k64", 4096, 64, SG, false, 0, 0, true},
        {"e8192k8192", 8192, 8192, SM},
        {"e5000grp", 5000, 20, SP, false, 10, 5, true},
    };
    uint64_t seed = 1;
    for (const Cfg& c : cfgs) {
      int T = c.E >= 4096 ? 16 : (c.E >= 896 ? 257 : 1031);
      if (small) T = c.E >= 4096 ? 2 : 37;
      RunCase(c, T, Dt::kBF16, It::kS32, Fill::kNormal, false, seed++);
      RunCase(c, T, Dt::kF32, It::kS64, Fill::kNormal, true, seed++);
      if (c.E < 4096) {
        RunCase(c, T, Dt::kF16, It::kS16, Fill::kInts, false, seed++);
        RunCase(c, small ? 5 : 67, Dt::kBF16, It::kS32, Fill::kZeros, true, seed++);
        RunCase(c, T, Dt::kF32, It::kS32, Fill::kNonFinite, false, seed++);
      }
    }
    std::printf("selftest: %s (%d failing cases)\n", g_fail ? "FAILED" : "all passed", g_fail);
  }
  if (bench) Bench();
  return g_fail ? 1 : 0;
}
