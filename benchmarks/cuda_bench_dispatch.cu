// Kernel-time micro-benchmark of the dispatch kernels without JAX (the through-JAX figures are
// benchmarks/bench_dispatch.py's): the plan (memset + count + rank kernels) timed as CUDA graphs
// of back-to-back plans and as plain back-to-back launches, permute and unpermute (several
// unpermute layouts, to choose one) with CUDA events, all on rotating input sets larger than
// L2, against the copy bandwidth measured in the same run. The plan of set 0 is checked against
// a host count; the unpermute layouts against each other, bit for bit. Correctness proper lives
// in the test suite (tests/test_dispatch*.py).
//
//   nvcc -std=c++17 -O3 -arch=sm_90 --expt-relaxed-constexpr -fmad=false -Iffi \
//        benchmarks/cuda_bench_dispatch.cu -o /tmp/cuda_bench_dispatch && /tmp/cuda_bench_dispatch
//   BENCH_T=65536 BENCH_OPS=plan /tmp/cuda_bench_dispatch   # one size, the plan only (profiling)
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


// The same through a CUDA graph holding `per_graph` calls (as XLA's command buffers replay
// them): us per call, launch gaps inside the graph included.
static float TimeGraph(const std::function<void(int)>& f, int sets, int per_graph) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < per_graph; ++i) f(i % sets);
  CK(cudaStreamEndCapture(g_stream, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  const float us = TimeEvents([&](int) { CK(cudaGraphLaunch(ge, g_stream)); }, 1, 20, g_stream);
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  return us / per_graph;
}

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

// Experiment (not in the library): the plan's first pass by one block per group of tiles,
// writing the tiles' counts and the group's sums directly, so that the plan needs no memset
// and no global atomics (one graph node fewer), at the price of a grid of only `groups`
// blocks. The rank kernel is the library's. Timed as the "group count" row.
template <typename I>
__global__ void __launch_bounds__(1024) group_count_kernel(PlanArgs a) {
  extern __shared__ int32_t tab[];  // [tiles of the group, E]
  allow_next_grid();
  const int32_t E = a.experts;
  const int64_t g = blockIdx.x, t0 = g * a.group;
  const int64_t t1 = t0 + a.group < a.tiles ? t0 + a.group : a.tiles;
  const int64_t ntab = (t1 - t0) * E;
  for (int64_t x = threadIdx.x; x < ntab; x += blockDim.x) tab[x] = 0;
  __syncthreads();  // orders the zeroing before the counts
  const int64_t i0 = t0 * kPlanTile, i1 = t1 * kPlanTile;
  constexpr int kInFlight = 8;
  for (int64_t base = i0 + threadIdx.x; base < i1; base += kInFlight * blockDim.x) {
    int32_t ex[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) ex[u] = plan_expert<I>(a, base + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int64_t i = base + u * blockDim.x;
      if (ex[u] < E) atomicAdd(&tab[((i - i0) / kPlanTile) * E + ex[u]], 1);
    }
  }
  __syncthreads();  // orders every count before the copy out
  for (int64_t x = threadIdx.x; x < ntab; x += blockDim.x) a.counts[t0 * E + x] = tab[x];
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t sum = 0;
    for (int64_t j = 0; j < t1 - t0; ++j) sum += tab[j * E + e];
    a.sums[g * E + e] = sum;
  }
}

// The plan with group_count_kernel in place of the memset and the count kernel (int32 ids,
// shared tables; false when they do not fit).
static bool LaunchPlanGroupCount(PlanArgs a, int32_t* workspace, cudaStream_t s) {
  a = OnWorkspace(a, workspace);
  const size_t smem = static_cast<size_t>(a.group) * a.experts * sizeof(int32_t);
  const int warps = PlanRankWarps(a.experts, a.tiles, SmCount(CurrentDevice()));
  if (smem > 48 * 1024 || warps == 0) return false;
  group_count_kernel<int32_t><<<static_cast<unsigned>(a.groups), 1024, smem, s>>>(a);
  CK((LaunchRankShared<int32_t, kPlanMaxWarps>(a, warps, s)));
  return true;
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
};

static PlanArgs ArgsFor(const PlanBufs& b, int64_t n, int E) {
  PlanArgs a;
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

int main() {
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
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
  std::printf("dispatch_plan, k=%d E=%d int32 ids (memset + count + rank kernels), us per plan\n",
              k, E);
  std::printf("%8s %6s %10s %10s %10s %6s\n", "tokens", "tiles", "graph_us", "events_us",
              "floor_us", "check");
  const char* only_t = std::getenv("BENCH_T");
  const char* ops = std::getenv("BENCH_OPS");
  auto skip = [&](int T) { return only_t != nullptr && std::atoi(only_t) != T; };
  for (int T : {16384, 65536, 262144}) {
    if (skip(T)) continue;
    const int64_t n = int64_t(T) * k;
    const int sets = 16;
    std::vector<PlanBufs> bufs(sets);
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
    }
    auto plan = [&](int s) {
      CK(LaunchPlan(ArgsFor(bufs[s], n, E), It::kS32, bufs[s].ws, g_stream));
    };
    auto grouped = [&](int s) {
      if (!LaunchPlanGroupCount(ArgsFor(bufs[s], n, E), bufs[s].ws, g_stream)) std::exit(3);
    };
    const double floor_us = 3.0 * n * 4 / bw * 1e6;  // ids read, positions and source written
    for (int variant = 0; variant < 2; ++variant) {
      const std::function<void(int)> f = variant == 0 ? std::function<void(int)>(plan) : grouped;
      CK(cudaMemset(bufs[0].pos, 0xAB, n * 4));
      CK(cudaMemset(bufs[0].src, 0xAB, n * 4));
      CK(cudaMemset(bufs[0].tpe, 0xAB, E * 4));
      f(0);
      CK(cudaStreamSynchronize(g_stream));
      const bool ok = CheckPlan(ids0, E, bufs[0]);
      const float tg = TimeGraph(f, sets, 32);
      const float te = TimeEvents(f, sets, 64, g_stream);
      std::printf("%8d %6lld %10.2f %10.2f %10.2f %6s%s\n", T,
                  static_cast<long long>(dispatch::plan_tiles(n)), tg, te, floor_us,
                  ok ? "ok" : "WRONG", variant == 0 ? "" : "  (experiment: group count)");
    }
    for (PlanBufs& b : bufs) {
      CK(cudaFree(b.ids));
      CK(cudaFree(b.tpe));
      CK(cudaFree(b.pos));
      CK(cudaFree(b.src));
      CK(cudaFree(b.ws));
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
