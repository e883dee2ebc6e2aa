// Kernel-time micro-benchmark of the dispatch kernels without JAX (the through-JAX figures are
// benchmarks/bench_dispatch.py's): the plan (zero + count + rank kernels) timed as CUDA graphs
// of back-to-back plans and as plain back-to-back launches, permute and unpermute (several
// unpermute layouts, to choose one) with CUDA events, all on rotating input sets larger than
// L2, against the copy bandwidth measured in the same run. The plan of set 0 is checked against
// a host count; the unpermute layouts against each other, bit for bit. Correctness proper lives
// in the test suite (tests/test_dispatch*.py).
//
//   nvcc -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -fmad=false -Iffi \
//        benchmarks/cuda_bench_dispatch.cu -o /tmp/cuda_bench_dispatch && /tmp/cuda_bench_dispatch
//   BENCH_T=65536 BENCH_OPS=plan /tmp/cuda_bench_dispatch   # one size, the plan only (profiling)
//   BENCH_PLAN_T=4096,65536 BENCH_OPS=plan ...  # the plan at those token counts
//   BENCH_PLAN_SETS=2 ...      # its ids hot in L2 (2 input sets instead of 16 rotating past it)
//   BENCH_PLAN_PRODUCER=1 ...  # each plan after a kernel that writes its ids, as in a layer
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_bench_util.cuh"
#include "dispatch_plan.cuh"
#include "dispatch_rows.cuh"

using namespace jax_router;
using namespace jax_router::cuda;


static cudaStream_t g_stream;


__global__ void fill_bf16(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    // a bfloat16 in [-2, 2): sign, exponent 126 or 127, random mantissa
    p[i] = static_cast<uint16_t>((h & 0x8000u) | (0x3F00u + ((h >> 16) & 0xFFu)));
  }
}

// k distinct experts per token, uniformly at random (as a top-k router gives).
static std::vector<int32_t> RandomIds(int T, int k, int E, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> perm(E), ids(static_cast<size_t>(T) * k);
  std::iota(perm.begin(), perm.end(), 0);
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      std::uniform_int_distribution<int> d(j, E - 1);
      std::swap(perm[j], perm[d(rng)]);
      ids[static_cast<size_t>(t) * k + j] = perm[j];
    }
  }
  return ids;
}

struct PlanBufs {
  int32_t *ids, *tpe, *pos, *src, *ws;
  int32_t* orig = nullptr;  // BENCH_PLAN_PRODUCER: the ids the producer copies into ids
};

// The kernel before the plan in BENCH_PLAN_PRODUCER mode, as the router before it in a layer:
// it writes the plan's ids (a copy of n ints), so the plan reads them from L2.
__global__ void produce_ids(const int4* from, int4* to, int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    to[i] = from[i];
  }
}

#if JR_PLAN_TRACE
static unsigned long long* g_trace;  // [sets][kPlanTraceSlots * 1024]
static int g_trace_set;
#endif

static PlanArgs ArgsFor(const PlanBufs& b, int64_t n, int E) {
  PlanArgs a;
#if JR_PLAN_TRACE
  a.trace = g_trace + static_cast<size_t>(g_trace_set) * kPlanTraceSlots * 1024;
#endif
  a.ids = b.ids;
  a.n = n;
  a.experts = E;
  a.rows = n;
  a.tokens_per_expert = b.tpe;
  a.positions = b.pos;
  a.source = b.src;
  return a;
}

static bool CheckPlan(const std::vector<int32_t>& ids, int E, const PlanBufs& b) {
  const size_t n = ids.size();
  std::vector<int32_t> tpe(E, 0), start(E, 0), pos(n), src(n);
  for (int32_t e : ids) ++tpe[e];
  for (int e = 1; e < E; ++e) start[e] = start[e - 1] + tpe[e - 1];
  std::vector<int32_t> gt(E), gp(n), gs(n);
  CK(cudaMemcpy(gt.data(), b.tpe, E * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gp.data(), b.pos, n * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gs.data(), b.src, n * 4, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < n; ++i) {
    pos[i] = start[ids[i]]++;
    src[pos[i]] = static_cast<int32_t>(i);
  }
  return gt == tpe && gp == pos && gs == src;
}

#if JR_PLAN_TRACE
// The last graph's last two plans (sets - 2 and sets - 1, back to back): per stamp, the first
// and last block, ns from the last plan's first count stamp.
static void PrintTrace(int sets, int blocks) {
  const size_t per = static_cast<size_t>(kPlanTraceSlots) * 1024;
  std::vector<unsigned long long> h(per * sets);
  CK(cudaMemcpy(h.data(), g_trace, h.size() * 8, cudaMemcpyDeviceToHost));
  // stamps never written (0: the buffer is zeroed once) are skipped, so a kernel variant may
  // stamp a slot from any of its blocks
  const char* names[kPlanTraceSlots] = {"count start", "counted", "count end", "scan start",
                                        "scan summed", "scan end", "rank start", "rank prewait",
                                        "rank released", "rank loaded", "positions", "rank end"};
  auto range = [&](int set, int slot, unsigned long long* lo, unsigned long long* hi) {
    *lo = ~0ull;
    *hi = 0;
    for (int b = 0; b < blocks; ++b) {
      const unsigned long long t = h[per * set + static_cast<size_t>(slot) * 1024 + b];
      if (t == 0) continue;
      *lo = std::min(*lo, t);
      *hi = std::max(*hi, t);
    }
  };
  unsigned long long t0, unused;
  range(sets - 1, 0, &t0, &unused);
  for (int set : {sets - 2, sets - 1}) {
    for (int slot = 0; slot < kPlanTraceSlots; ++slot) {
      unsigned long long lo, hi;
      range(set, slot, &lo, &hi);
      std::printf("  trace plan %s %-14s %8lld %8lld\n", set == sets - 1 ? "last" : "prev",
                  names[slot], static_cast<long long>(lo - t0), static_cast<long long>(hi - t0));
    }
  }
}
#endif

int main() {
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
#if JR_PLAN_TRACE
  CK(cudaMalloc(&g_trace, 16 * kPlanTraceSlots * 1024 * 8));
  CK(cudaMemset(g_trace, 0, 16 * kPlanTraceSlots * 1024 * 8));
#endif
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const size_t cb = size_t(1) << 30;
  void *c0, *c1;
  CK(cudaMalloc(&c0, cb));
  CK(cudaMalloc(&c1, cb));
  CK(cudaMemset(c0, 1, cb));
  const float cus = TimeEvents(
      [&](int) { CK(cudaMemcpyAsync(c1, c0, cb, cudaMemcpyDeviceToDevice, g_stream)); }, 1, 10,
      g_stream);
  const double bw = 2.0 * cb / (cus * 1e-6);  // bytes read + written per second
  CK(cudaFree(c0));
  CK(cudaFree(c1));
  std::printf("%s, %d SMs; copy bandwidth %.0f GB/s (1 GiB D2D, read + write)\n\n", prop.name,
              prop.multiProcessorCount, bw / 1e9);

  const int k = 8, E = 256, H = 7168;
  std::printf("dispatch_plan, k=%d E=%d int32 ids (zero + count + rank kernels), us per plan\n",
              k, E);
  std::printf("%8s %6s %10s %10s %10s %6s\n", "tokens", "tiles", "graph_us", "events_us",
              "floor_us", "check");
  const char* only_t = std::getenv("BENCH_T");
  const char* ops = std::getenv("BENCH_OPS");
  auto skip = [&](int T) { return only_t != nullptr && std::atoi(only_t) != T; };
  // BENCH_PLAN_T=4096,32768 (a list): the plan at those token counts instead
  const char* plan_t = std::getenv("BENCH_PLAN_T");
  const std::vector<int> plan_ts =
      plan_t != nullptr ? IntList(plan_t) : std::vector<int>{16384, 65536, 262144};
  for (int T : plan_ts) {
    if (skip(T)) continue;
    const int64_t n = int64_t(T) * k;
    // 16 sets rotate the ids past L2 (cold, as a plan after an unrelated kernel reads them);
    // BENCH_PLAN_SETS=2 keeps them in L2 (hot, as right after the router wrote them)
    const char* sets_env = std::getenv("BENCH_PLAN_SETS");
    const int sets = sets_env != nullptr ? std::min(16, std::max(2, std::atoi(sets_env))) : 16;
    std::vector<PlanBufs> bufs(sets);
    // BENCH_PLAN_PRODUCER=1: each plan after a kernel that writes its ids (graph_us holds both)
    const bool producer = std::getenv("BENCH_PLAN_PRODUCER") != nullptr;
    std::vector<int32_t> ids0;
    const int64_t wsn = dispatch::plan_workspace_size(n, E);
    for (int s = 0; s < sets; ++s) {
      std::vector<int32_t> ids = RandomIds(T, k, E, 100 + s);
      if (s == 0) ids0 = ids;
      PlanBufs& b = bufs[s];
      CK(cudaMalloc(&b.ids, n * 4));
      CK(cudaMalloc(&b.tpe, E * 4));
      CK(cudaMalloc(&b.pos, n * 4));
      CK(cudaMalloc(&b.src, n * 4));
      CK(cudaMalloc(&b.ws, wsn * 4));
      CK(cudaMemcpy(b.ids, ids.data(), n * 4, cudaMemcpyHostToDevice));
      if (producer) {
        CK(cudaMalloc(&b.orig, n * 4));
        CK(cudaMemcpy(b.orig, ids.data(), n * 4, cudaMemcpyHostToDevice));
      }
    }
    auto produce = [&](int s) {
      produce_ids<<<4 * 132, 256, 0, g_stream>>>(reinterpret_cast<const int4*>(bufs[s].orig),
                                                 reinterpret_cast<int4*>(bufs[s].ids), n / 4);
    };
    auto plan = [&](int s) {
#if JR_PLAN_TRACE
      g_trace_set = s;
#endif
      if (producer) produce(s);
      CK(LaunchPlan(ArgsFor(bufs[s], n, E), It::kS32, bufs[s].ws, g_stream));
    };
    const double floor_us = 3.0 * n * 4 / bw * 1e6;  // ids read, positions and source written
    CK(cudaMemset(bufs[0].pos, 0xAB, n * 4));
    CK(cudaMemset(bufs[0].src, 0xAB, n * 4));
    CK(cudaMemset(bufs[0].tpe, 0xAB, E * 4));
    plan(0);
    CK(cudaStreamSynchronize(g_stream));
    const bool ok = CheckPlan(ids0, E, bufs[0]);
    const float tg = TimeGraph(plan, sets, 32, g_stream);
#if JR_PLAN_TRACE
    PrintTrace(sets, static_cast<int>(dispatch::plan_tiles(n)));
#endif
    const float te = TimeEvents(plan, sets, 64, g_stream);
    std::printf("%8d %6lld %10.2f %10.2f %10.2f %6s\n", T,
                static_cast<long long>(dispatch::plan_tiles(n)), tg, te, floor_us,
                ok ? "ok" : "WRONG");
    if (producer) {
      const float tp = TimeGraph(produce, sets, 32, g_stream);
      std::printf("  producer %8d %10.2f alone, plan after it %10.2f\n", T, tp, tg - tp);
    }
    for (PlanBufs& b : bufs) {
      CK(cudaFree(b.ids));
      CK(cudaFree(b.tpe));
      CK(cudaFree(b.pos));
      CK(cudaFree(b.src));
      CK(cudaFree(b.ws));
      if (b.orig != nullptr) CK(cudaFree(b.orig));
    }
  }

  if (ops != nullptr && std::string(ops) == "plan") return 0;
  std::printf("\npermute / unpermute, H=%d bf16, f32 weights, k=%d E=%d; %% copy: rows read + "
              "written over the copy bandwidth\n", H, k, E);
  std::printf("%-28s %8s %10s %8s\n", "kernel", "tokens", "us", "% copy");
  for (int T : {4096, 16384}) {
    if (skip(T)) continue;
    const int64_t n = int64_t(T) * k, R = n;
    const int sets = 2;
    std::vector<PlanBufs> pb(sets);
    std::vector<uint16_t*> xs(sets), rows(sets), outs(sets), ref(sets);
    std::vector<float*> ws(sets);
    for (int s = 0; s < sets; ++s) {
      std::vector<int32_t> ids = RandomIds(T, k, E, 7 + s);
      PlanBufs& b = pb[s];
      CK(cudaMalloc(&b.ids, n * 4));
      CK(cudaMalloc(&b.tpe, E * 4));
      CK(cudaMalloc(&b.pos, n * 4));
      CK(cudaMalloc(&b.src, n * 4));
      CK(cudaMalloc(&b.ws, dispatch::plan_workspace_size(n, E) * 4));
      CK(cudaMemcpy(b.ids, ids.data(), n * 4, cudaMemcpyHostToDevice));
      CK(LaunchPlan(ArgsFor(b, n, E), It::kS32, b.ws, g_stream));
      CK(cudaMalloc(&xs[s], size_t(T) * H * 2));
      CK(cudaMalloc(&rows[s], size_t(R) * H * 2));
      CK(cudaMalloc(&outs[s], size_t(T) * H * 2));
      CK(cudaMalloc(&ref[s], size_t(T) * H * 2));
      CK(cudaMalloc(&ws[s], n * 4));
      fill_bf16<<<1024, 256, 0, g_stream>>>(xs[s], size_t(T) * H, 11 + s);
      fill_bf16<<<1024, 256, 0, g_stream>>>(rows[s], size_t(R) * H, 23 + s);
      std::vector<float> w(n);
      std::mt19937 rng(s);
      std::uniform_real_distribution<float> ud(0.0f, 1.0f);
      for (float& v : w) v = ud(rng);
      CK(cudaMemcpy(ws[s], w.data(), n * 4, cudaMemcpyHostToDevice));
    }
    CK(cudaStreamSynchronize(g_stream));
    auto rows_args = [&](int s, bool unperm) {
      RowsArgs a;
      a.tokens = T;
      a.topk = k;
      a.hidden = H;
      a.rows = R;
      a.x = unperm ? static_cast<const void*>(rows[s]) : xs[s];
      a.index = unperm ? pb[s].pos : pb[s].src;
      a.weights = unperm ? ws[s] : nullptr;
      a.w_dt = Dt::kF32;
      a.out = unperm ? static_cast<void*>(outs[s]) : rows[s];
      a.out_dt = Dt::kBF16;
      return a;
    };
    const double moved_p = 2.0 * R * H * 2, moved_u = double(R + T) * H * 2;
    const float tp = TimeEvents([&](int s) { CK(LaunchPermute(rows_args(s, false), Dt::kBF16, g_stream)); }, sets, 10, g_stream);
    std::printf("%-28s %8d %10.1f %8.0f\n", "permute", T, tp, 100.0 * moved_p / (tp * 1e-6) / bw);
    // re-fill the rows that permute overwrote, so unpermute reads the same values every layout
    for (int s = 0; s < sets; ++s) fill_bf16<<<1024, 256, 0, g_stream>>>(rows[s], size_t(R) * H, 23 + s);
    struct Variant {
      const char* name;
      void (*kernel)(RowsArgs);
    };
    const Variant variants[] = {
        {"unpermute LaunchUnpermute", nullptr},  // the default layout
        {"unpermute unroll4 slots1", unpermute_kernel<DBF16, true, true, 4, 1>},
        {"unpermute unroll4 slots2", unpermute_kernel<DBF16, true, true, 4, 2>},
        {"unpermute unroll2 slots4", unpermute_kernel<DBF16, true, true, 2, 4>},
        {"unpermute unroll4 slots4", unpermute_kernel<DBF16, true, true, 4, 4>},
        {"unpermute unroll8 slots1", unpermute_kernel<DBF16, true, true, 8, 1>},
        {"unpermute unroll4 slots2 cs", unpermute_kernel<DBF16, true, true, 4, 2, true>},
        {"unpermute unroll2 slots4 cs", unpermute_kernel<DBF16, true, true, 2, 4, true>},
    };
    for (const Variant& v : variants) {
      auto run = [&](int s) {
        if (v.kernel == nullptr) {
          CK(LaunchUnpermute(rows_args(s, true), Dt::kBF16, g_stream));
        } else {
          v.kernel<<<RowGrid(T), kRowThreads, 0, g_stream>>>(rows_args(s, true));
          CK(cudaGetLastError());
        }
      };
      run(0);
      CK(cudaStreamSynchronize(g_stream));
      bool same = true;
      if (v.kernel == nullptr) {
        CK(cudaMemcpy(ref[0], outs[0], size_t(T) * H * 2, cudaMemcpyDeviceToDevice));
      } else {
        std::vector<uint16_t> x(size_t(T) * H), y(size_t(T) * H);
        CK(cudaMemcpy(x.data(), ref[0], x.size() * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(y.data(), outs[0], y.size() * 2, cudaMemcpyDeviceToHost));
        same = x == y;
      }
      const float tu = TimeEvents(run, sets, 10, g_stream);
      std::printf("%-28s %8d %10.1f %8.0f%s\n", v.name, T, tu,
                  100.0 * moved_u / (tu * 1e-6) / bw, same ? "" : "  BITS DIFFER");
    }
    for (int s = 0; s < sets; ++s) {
      CK(cudaFree(pb[s].ids));
      CK(cudaFree(pb[s].tpe));
      CK(cudaFree(pb[s].pos));
      CK(cudaFree(pb[s].src));
      CK(cudaFree(pb[s].ws));
      CK(cudaFree(xs[s]));
      CK(cudaFree(rows[s]));
      CK(cudaFree(outs[s]));
      CK(cudaFree(ref[s]));
      CK(cudaFree(ws[s]));
    }
  }
  return 0;
}
