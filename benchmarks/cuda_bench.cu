// Micro-benchmark of the CUDA router kernels without JAX: CUDA events over back-to-back
// launches ("us") and a CUDA graph of 32 launches ("graph_us", the x-floor column's time) on
// rotating input sets (more bytes than L2), against the copy bandwidth.
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
struct Cfg {
  std::string name;
  int E, k;
  ScoreFn fn;
  bool pre = false;
  int G = 0, gk = 0;
  bool bias = false;
  float scaling = 1.0f;
  bool on_request = false;  // run only when BENCH_CFG names it (launch-threshold probes)
};


static cudaStream_t g_stream;

struct Times {
  float events, graph;  // us per call: back-to-back launches, and a CUDA graph of 32 calls
};
static Times TimeBoth(const std::function<void(int)>& f, int sets) {
  return {TimeEvents(f, sets, 200, g_stream), TimeGraph(f, sets, 32, g_stream)};
}
// x_floor is taken against the graph time (the closer of the two to the kernel time).
static void Row(const Cfg& c, int T, const char* dts, const char* mode, Times t, double floor_us,
                const char* note = "") {
  std::printf("%-12s %7d %4s %-13s %9.2f %9.2f %9.2f %7.2f%s\n", c.name.c_str(), T, dts, mode,
              t.events, t.graph, floor_us, t.graph / floor_us, note);
}

static void Bench() {
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  // Copy ceiling.
  const size_t cb = size_t(1) << 30;
  void *s0, *s1;
  CK(cudaMalloc(&s0, cb));
  CK(cudaMalloc(&s1, cb));
  CK(cudaMemset(s0, 1, cb));
  float us = TimeEvents([&](int) { CK(cudaMemcpyAsync(s1, s0, cb, cudaMemcpyDeviceToDevice, g_stream)); }, 1, 10, g_stream);
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
      // E = 256 and 384 softmax take the screen with two lanes a token: where it starts to win
      {"softmax-256", 256, 8, ScoreFn::kSoftmax, false, 0, 0, false, 1.0f, true},
      {"softmax-384", 384, 8, ScoreFn::kSoftmax, false, 0, 0, false, 1.0f, true},
  };
  std::printf("%-12s %7s %4s %-13s %9s %9s %9s %7s\n", "config", "T", "dt", "mode", "us", "graph_us", "floor_us",
              "x_floor");
  const char* fcfg = std::getenv("BENCH_CFG");
  const char* fT = std::getenv("BENCH_T");
  const char* fdt = std::getenv("BENCH_DT");
  for (const Cfg& c : cfgs) {
    const bool named = fcfg && ("," + std::string(fcfg) + ",").find("," + c.name + ",") != std::string::npos;
    if ((fcfg && !named) || (c.on_request && !named)) {
      continue;  // BENCH_CFG: a comma-separated list of config names
    }
    // BENCH_T: a comma-separated list instead
    const std::vector<int> sizes = fT ? IntList(fT) : std::vector<int>{16384, 65536};
    for (int T : sizes) {
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
          CK(LaunchForward(b, g_stream));
        };
        for (int s = 0; s < sets; ++s) fwd(s, false);
        CK(cudaStreamSynchronize(g_stream));
        const double fl_c = (double(T) * c.E * es + double(T) * c.k * 12) / (bw * 1e12) * 1e6;
        const double fl_d = (2.0 * T * c.E * es + double(T) * c.k * 8) / (bw * 1e12) * 1e6;
        const double fl_b = (double(T) * c.k * 12 + double(T) * c.E * es) / (bw * 1e12) * 1e6;
        const Times tc = TimeBoth([&](int s) { fwd(s, false); }, sets);
        const long long ll = LastFastLaunch().load();
        std::printf("  (fast grid %lld, blocks/SM %lld)\n", ll / 1000, ll % 1000);
        const Times td = TimeBoth([&](int s) { fwd(s, true); }, sets);
        BwdArgs bb;
        bb.rows = T;
        bb.experts = c.E;
        bb.p = a.p;
        bb.dense_grad = false;
        bb.grad_dt = Dt::kF32;
        bb.index_dt = It::kS32;
        bb.logits_dt = dt;
        bb.out_dt = dt;
        const Times tb = TimeBoth(
            [&](int s) {
              BwdArgs q = bb;
              q.grad = ws[s];
              q.indices = idx[s];
              q.act = acts[s];
              q.grad_logits = outs[s];
              CK(LaunchBackward(q, g_stream));
            },
            sets);
        const char* dts = dt == Dt::kF32 ? "f32" : "bf16";
        Row(c, T, dts, "compact", tc, fl_c);
        {
          // a hash of set 0's dense probs, so that two builds (an A/B of a kernel change)
          // can be compared bit for bit from their logs
          fwd(0, true);
          CK(cudaStreamSynchronize(g_stream));
          std::vector<unsigned char> hp(xb);
          CK(cudaMemcpy(hp.data(), probs[0], xb, cudaMemcpyDeviceToHost));
          unsigned long long h = 1469598103934665603ull;
          for (unsigned char ch : hp) h = (h ^ ch) * 1099511628211ull;
          char note[64];
          std::snprintf(note, sizeof(note), "  (probs fnv1a %016llx)", h);
          Row(c, T, dts, "dense", td, fl_d, note);
        }
        Row(c, T, dts, "bwd", tb, fl_b);
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
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a log file as it is printed
  Bench();
  return 0;
}
