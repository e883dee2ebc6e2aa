// Micro-benchmark of the CUDA router kernels without JAX: CUDA events over back-to-back
// launches on rotating input sets (more bytes than L2), against the copy bandwidth.
// Correctness lives in the test suite (tests/test_cross_platform.py and the reference tests).
//
//   nvcc -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -fmad=false -Iffi \
//        benchmarks/cuda_bench.cu -o /tmp/cuda_bench && /tmp/cuda_bench
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

#include "cuda_bench_util.cuh"
#include "router_launch.cuh"

using namespace jax_router;
using namespace jax_router::cuda;


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


// Experiment (not in the library): a small-E compact forward, one thread per token, the row's
// E <= kE logits in registers, k <= kK passes of a 64-bit slot-key maximum (routing_math.h
// slot_key: the library's order and ties), weights by routing_math.h's formulas in slot order.
// No groups, no pre-softmax, compact outputs only. The "compact-small" row times it and says
// whether its weights, indices and residuals equal the library kernel's, bit for bit.
template <typename D, ScoreFn F, int kE, int kK>
__global__ void __launch_bounds__(256) small_e_kernel(FwdArgs f) {
  using R = typename D::raw;
  const int E = static_cast<int>(f.experts), k = static_cast<int>(f.p.topk);
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < f.rows;
       t += int64_t(gridDim.x) * blockDim.x) {
    const R* xr = static_cast<const R*>(f.logits) + t * E;
    float x[kE];
    constexpr int kPer = 16 / sizeof(R);
    if (E == kE && kE % kPer == 0 && (reinterpret_cast<uintptr_t>(xr) & 15u) == 0) {
#pragma unroll
      for (int q = 0; q < kE / kPer; ++q) {
        D::unpack16(__ldg(reinterpret_cast<const uint4*>(xr) + q), &x[q * kPer]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kE; ++i) x[i] = i < E ? D::to_f(xr[i]) : 0.0f;
    }
    unsigned long long key[kE];
#pragma unroll
    for (int i = 0; i < kE; ++i) {
      const float sv = activation<F>(x[i]);
      const float z = f.bias ? selection_score(sv, f.bias[i]) : sv;
      key[i] = i < E ? slot_key(order_key(z), static_cast<uint32_t>(i)) : 0ull;
    }
    int sel[kK];
    float v[kK];
#pragma unroll
    for (int r = 0; r < kK; ++r) {
      unsigned long long best = 0ull;
      int bi = 0;
      float bv = 0.0f;
#pragma unroll
      for (int i = 0; i < kE; ++i) {
        if (key[i] > best) {
          best = key[i];
          bi = i;
          bv = x[i];
        }
      }
#pragma unroll
      for (int i = 0; i < kE; ++i) key[i] = i == bi ? 0ull : key[i];
      sel[r] = bi;
      v[r] = activation<F>(bv);
    }
    float u[kK];
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kK; ++r) {
      if (r < k) {
        u[r] = weight_numerator<F>(false, v[r], v[0], v[r]);
        sum = r == 0 ? u[r] : slot_sum_add(sum, u[r]);
      }
    }
    const float denom = weight_denominator<F>(sum);
    const int64_t ko = t * k;
#pragma unroll
    for (int r = 0; r < kK; ++r) {
      if (r < k) {
        const float p = weight<F>(false, k, u[r], denom);
        f.weights[ko + r] = exact::canonical(f.p.scaling * p);
        store_index(f.indices, f.index_dt, ko + r, sel[r]);
        f.act[ko + r] = exact::canonical(residual<F>(false, p, u[r]));
      }
    }
  }
}

// Experiment (not in the library): the compact backward (element-wise functions and raw
// softmax) with each row assembled in shared memory, zeros and the k entries, then written once
// with 16-byte stores, instead of the library's zero stores followed by k scattered 2- or
// 4-byte stores a row (one L2 write request each). The sums and every value are computed as
// the library's bwd_kernel computes them (8 lanes a row, slot order), so the bits must match.
// Rows of E elements with E * sizeof(R) a multiple of 16; 32 rows a 256-thread block. The
// slot-sum loop is a copy of bwd_kernel's, kept apart so that the experiment cannot change the
// library's code before it is measured; if it is kept, it replaces the library's row stores and
// the loop stays in one place.
template <typename D, ScoreFn F>
__global__ void __launch_bounds__(256) bwd_staged_kernel(BwdArgs b) {
  using R = typename D::raw;
  constexpr int L = 8;
  extern __shared__ __align__(16) unsigned char stage[];
  const int E = static_cast<int>(b.experts), k = static_cast<int>(b.p.topk);
  const int j = threadIdx.x % L;
  R* row_s = reinterpret_cast<R*>(stage) + (threadIdx.x / L) * static_cast<int64_t>(E);
  const int nvec = E * static_cast<int>(sizeof(R)) / 16;
  const int64_t grp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / L;
  const int64_t ngrp = (static_cast<int64_t>(gridDim.x) * blockDim.x) / L;
  const int64_t iters = (b.rows + ngrp - 1) / ngrp;
  R* out = static_cast<R*>(b.grad_logits);
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t row = grp + it * ngrp;
    const bool ok_row = row < b.rows;
    const int64_t ko = row * k, ro = row * E;
    float A = 0.0f, B = 0.0f;
    for (int r0 = 0; r0 < k; r0 += L) {
      const int r = r0 + j;
      float g = 0.0f, sv = 0.0f;
      if (ok_row && r < k) {
        const int64_t e = load_index(b.indices, b.index_dt, ko + r);
        const bool ok = e >= 0 && e < E;
        g = load_as_float(b.grad, b.grad_dt, ko + r);
        g = ok ? b.p.scaling * g : 0.0f;
        sv = b.act[ko + r];
      }
      const int n = min(L, k - r0);
      for (int q = 0; q < n; ++q) {
        const float sq = __shfl_sync(0xFFFFFFFFu, sv, q, L);
        const float gq = __shfl_sync(0xFFFFFFFFu, g, q, L);
        A = r0 + q == 0 ? sq : slot_sum_add(A, sq);
        B = dot_add(B, gq, sq);
      }
    }
    for (int q = j; q < nvec; q += L) reinterpret_cast<uint4*>(row_s)[q] = make_uint4(0, 0, 0, 0);
    __syncwarp();  // the row's zeros are in shared memory before the k entries overwrite theirs
    if (ok_row) {
      for (int r = j; r < k; r += L) {
        const int64_t e = load_index(b.indices, b.index_dt, ko + r);
        if (e < 0 || e >= E) continue;
        const float g = b.p.scaling * load_as_float(b.grad, b.grad_dt, ko + r);
        row_s[e] = D::from_f(grad_logit<F>(k, g, b.act[ko + r], A, B));
      }
    }
    __syncwarp();  // the row is complete before it is copied out
    if (ok_row) {
      uint4* dst = reinterpret_cast<uint4*>(out + ro);
      for (int q = j; q < nvec; q += L) dst[q] = reinterpret_cast<const uint4*>(row_s)[q];
    }
    __syncwarp();  // the copy has read the row before the next row's zeros
  }
}

static void Bench() {
  // Copy ceiling.
  const size_t cb = size_t(1) << 30;
  void *s0, *s1;
  CK(cudaMalloc(&s0, cb));
  CK(cudaMalloc(&s1, cb));
  CK(cudaMemset(s0, 1, cb));
  float us = TimeEvents([&](int) { CK(cudaMemcpyAsync(s1, s0, cb, cudaMemcpyDeviceToDevice)); }, 1, 10);
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
        float tc = TimeEvents([&](int s) { fwd(s, false); }, sets, 200);
        const long long ll = LastFastLaunch().load();
        std::printf("  (fast grid %lld, blocks/SM %lld)\n", ll / 1000, ll % 1000);
        float td = TimeEvents([&](int s) { fwd(s, true); }, sets, 200);
        BwdArgs bb;
        bb.rows = T;
        bb.experts = c.E;
        bb.p = a.p;
        bb.dense_grad = false;
        bb.grad_dt = Dt::kF32;
        bb.index_dt = It::kS32;
        bb.logits_dt = dt;
        bb.out_dt = dt;
        float tb = TimeEvents(
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
        if (!c.pre && c.E > 16 && (c.E * es) % 16 == 0 && 32 * c.E * es <= 48 * 1024) {
          // the staged-backward experiment, compared with the library's backward bit for bit
          void* o2;
          CK(cudaMalloc(&o2, static_cast<size_t>(T) * c.E * es));
          const size_t smem = 32 * c.E * es;
          const int64_t cap = static_cast<int64_t>(SmCount(CurrentDevice())) * 8;
          const unsigned grid = static_cast<unsigned>(std::min<int64_t>((T + 31) / 32, cap));
          auto staged = [&](int s) {
            BwdArgs q = bb;
            q.grad = ws[s];
            q.indices = idx[s];
            q.act = acts[s];
            q.grad_logits = s == 0 ? o2 : outs[s];
            DispatchScoreFn(c.fn, [&](auto fn) {
              if (dt == Dt::kF32) {
                bwd_staged_kernel<DF32, decltype(fn)::value><<<grid, 256, smem>>>(q);
              } else {
                bwd_staged_kernel<DBF16, decltype(fn)::value><<<grid, 256, smem>>>(q);
              }
              return 0;
            });
            CK(cudaGetLastError());
          };
          BwdArgs q0 = bb;
          q0.grad = ws[0];
          q0.indices = idx[0];
          q0.act = acts[0];
          q0.grad_logits = outs[0];
          CK(LaunchBackward(q0, 0));
          staged(0);
          CK(cudaDeviceSynchronize());
          const size_t ob = static_cast<size_t>(T) * c.E * es;
          std::vector<unsigned char> h1(ob), h2(ob);
          CK(cudaMemcpy(h1.data(), outs[0], ob, cudaMemcpyDeviceToHost));
          CK(cudaMemcpy(h2.data(), o2, ob, cudaMemcpyDeviceToHost));
          const float tst = TimeEvents(staged, sets, 200);
          std::printf("%-12s %7d %4s %-8s %9.2f %9.2f %7.2f  (experiment, %s)\n", c.name.c_str(), T,
                      dts, "bwd-staged", tst, fl_b, tst / fl_b,
                      h1 == h2 ? "bits equal the library's" : "BITS DIFFER");
          CK(cudaFree(o2));
        }
        if (c.E == 8 && c.k <= 2 && c.fn == ScoreFn::kSoftmax && !c.pre && c.G == 0) {
          // the experiment, into its own buffers, compared with the library's compact outputs
          const size_t kb = static_cast<size_t>(T) * c.k * 4;
          float *w2, *a2;
          int32_t* i2;
          CK(cudaMalloc(&w2, kb));
          CK(cudaMalloc(&a2, kb));
          CK(cudaMalloc(&i2, kb));
          auto small = [&](int s) {
            FwdArgs b = a;
            b.logits = xs[s];
            b.weights = s == 0 ? w2 : ws[s];
            b.indices = s == 0 ? i2 : idx[s];
            b.act = s == 0 ? a2 : acts[s];
            const unsigned grid = static_cast<unsigned>((T + 255) / 256);
            if (dt == Dt::kF32) {
              small_e_kernel<DF32, ScoreFn::kSoftmax, 8, 2><<<grid, 256>>>(b);
            } else {
              small_e_kernel<DBF16, ScoreFn::kSoftmax, 8, 2><<<grid, 256>>>(b);
            }
            CK(cudaGetLastError());
          };
          fwd(0, false);
          small(0);
          CK(cudaDeviceSynchronize());
          std::vector<unsigned char> h1(kb), h2(kb);
          bool same = true;
          for (auto [x1, x2] : {std::pair<void*, void*>{ws[0], w2}, {idx[0], i2}, {acts[0], a2}}) {
            CK(cudaMemcpy(h1.data(), x1, kb, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(h2.data(), x2, kb, cudaMemcpyDeviceToHost));
            same = same && h1 == h2;
          }
          const float tsm = TimeEvents(small, sets, 200);
          std::printf("%-12s %7d %4s %-8s %9.2f %9.2f %7.2f  (experiment, %s)\n", c.name.c_str(), T,
                      dts, "compact-small", tsm, fl_c, tsm / fl_c,
                      same ? "bits equal the library's" : "BITS DIFFER");
          CK(cudaFree(w2));
          CK(cudaFree(a2));
          CK(cudaFree(i2));
        }
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

int main() {
  Bench();
  return 0;
}
