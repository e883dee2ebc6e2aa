// CPU handlers of the dispatch targets (contract: dispatch_contract.h; arithmetic:
// dispatch_math.h, shared with the CUDA kernels).
//
// The plan is the CUDA kernels' algorithm without a sort: counts per tile of kPlanTile flat
// entries (tiles in parallel), an exclusive scan over tiles per expert and one over experts,
// then each tile ranks its entries from its scanned counts (tiles in parallel). (The CUDA
// kernels find a tile's first ranks through group sums instead of a serial scan; the ranks are
// the same integers.) Rows and
// tokens run in parallel chunks over XLA's thread pool (ParallelRows, subnormals kept).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_util.h"
#include "dispatch_contract.h"
#include "dispatch_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_router {
namespace {

using dispatch::kPlanTile;

// Calls fn(I{}) with I the C++ type of an index dtype (the contract admits only these three).
template <typename Fn>
void DispatchIndex(ffi::DataType t, Fn&& fn) {
  switch (t) {
    case ffi::DataType::S16:
      fn(int16_t{});
      break;
    case ffi::DataType::S64:
      fn(int64_t{});
      break;
    default:
      fn(int32_t{});
      break;
  }
}

float LoadWeight(const void* w, ffi::DataType t, int64_t i) {
  switch (t) {
    case ffi::DataType::BF16:
      return ToFloat(static_cast<const BF16*>(w)[i]);
    case ffi::DataType::F16:
      return ToFloat(static_cast<const F16*>(w)[i]);
    default:
      return static_cast<const float*>(w)[i];
  }
}

// ---- plan ----------------------------------------------------------------------------------

template <typename I>
void Plan(ffi::ThreadPool* pool, const PlanProblem& p) {
  const I* ids = static_cast<const I*>(p.ids);
  const int64_t E = p.experts, nb = p.tiles;
  int32_t* counts = p.workspace;  // [nb, E]
  std::vector<int32_t> starts(E);
  auto chunk = [&](int64_t b) {
    return std::pair<int64_t, int64_t>(b * kPlanTile, std::min(p.n, (b + 1) * kPlanTile));
  };
  // 1. counts per (tile, expert); dropped ids land on the sentinel E and are not counted
  ParallelRows(pool, nb, kPlanTile, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* c = counts + b * E;
      std::fill_n(c, E, 0);
      auto [i0, i1] = chunk(b);
      for (int64_t i = i0; i < i1; ++i) {
        const int32_t e = dispatch::expert_or_drop(static_cast<int64_t>(ids[i]), E);
        if (e < E) ++c[e];
      }
    }
  });
  // 2. exclusive scan over tiles per expert (in place: counts become each tile's first rank)
  //    and over experts (the expert starts)
  std::vector<int32_t> run(E, 0);
  for (int64_t b = 0; b < nb; ++b) {
    int32_t* c = counts + b * E;
    for (int64_t e = 0; e < E; ++e) {
      const int32_t t = c[e];
      c[e] = run[e];
      run[e] += t;
    }
  }
  int32_t packed = 0;
  for (int64_t e = 0; e < E; ++e) {
    p.tokens_per_expert[e] = run[e];
    starts[e] = dispatch::expert_start(static_cast<int32_t>(e), packed, p.capacity);
    packed += run[e];
  }
  // 3. empty rows are -1; each tile ranks its entries in flat order from its first ranks
  ParallelRows(pool, p.rows, 1, [&](int64_t r0, int64_t r1) {
    std::fill(p.source + r0, p.source + r1, -1);
  });
  ParallelRows(pool, nb, kPlanTile, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* next = counts + b * E;
      auto [i0, i1] = chunk(b);
      for (int64_t i = i0; i < i1; ++i) {
        const int32_t e = dispatch::expert_or_drop(static_cast<int64_t>(ids[i]), E);
        int32_t row = -1;
        if (e < E) row = dispatch::plan_row(starts[e], next[e]++, p.capacity);
        p.positions[i] = row;
        if (row >= 0) p.source[row] = static_cast<int32_t>(i);
      }
    }
  });
}

ffi::Error PlanCpu(ffi::ThreadPool pool, int64_t num_experts, int64_t capacity,
                   ffi::AnyBuffer ids, ffi::Result<ffi::AnyBuffer> tpe,
                   ffi::Result<ffi::AnyBuffer> positions, ffi::Result<ffi::AnyBuffer> source,
                   ffi::Result<ffi::AnyBuffer> workspace) {
  PlanProblem p;
  JR_RETURN_IF_ERROR(
      MakePlanProblem(p, num_experts, capacity, ids, *tpe, *positions, *source, *workspace));
  DispatchIndex(p.id_dtype, [&](auto tag) { Plan<decltype(tag)>(&pool, p); });
  return ffi::Error::Success();
}

// ---- permute -------------------------------------------------------------------------------

template <typename T>
void PermuteRows(const RowsProblem& p, int64_t r0, int64_t r1) {
  const int64_t H = p.hidden, n = p.tokens * p.topk;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = p.index[r];
    T* dst = out + r * H;
    if (!dispatch::in_range(s, n)) {
      std::memset(dst, 0, H * sizeof(T));  // +0 is all zero bits in every float type
      continue;
    }
    const T* src = x + (s / p.topk) * H;
    if (p.weights == nullptr) {
      std::memcpy(dst, src, H * sizeof(T));  // the bits, as the reference's gather
      continue;
    }
    const float w = LoadWeight(p.weights, p.w_dtype, s);
    for (int64_t h = 0; h < H; ++h) dst[h] = FromFloat<T>(dispatch::scale(w, ToFloat(src[h])));
  }
}

ffi::Error PermuteCpu(ffi::ThreadPool pool, int64_t topk, ffi::AnyBuffer x,
                      ffi::AnyBuffer source, ffi::AnyBuffer weights,
                      ffi::Result<ffi::AnyBuffer> rows) {
  RowsProblem p;
  JR_RETURN_IF_ERROR(MakePermuteProblem(p, topk, x, source, weights, *rows));
  if (p.rows == 0 || p.hidden == 0) return ffi::Error::Success();
  return DispatchFloat(p.dtype, [&](auto tag) {
    ParallelRows(&pool, p.rows, p.hidden, [&](int64_t r0, int64_t r1) {
      PermuteRows<decltype(tag)>(p, r0, r1);
    });
  });
}

// ---- unpermute -----------------------------------------------------------------------------

template <typename T>
void UnpermuteTokens(const RowsProblem& p, int64_t t0, int64_t t1) {
  const int64_t H = p.hidden, K = p.topk;
  const T* rows = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  std::vector<float> acc(H);
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t r = p.index[t * K + j];
      if (!dispatch::in_range(r, p.rows)) continue;
      const float w = p.weights ? LoadWeight(p.weights, p.w_dtype, t * K + j) : 1.0f;
      const T* v = rows + r * H;
      for (int64_t h = 0; h < H; ++h) acc[h] = dispatch::combine_add(acc[h], w, ToFloat(v[h]));
    }
    T* o = out + t * H;
    for (int64_t h = 0; h < H; ++h) o[h] = FromFloat<T>(acc[h]);
  }
}

ffi::Error UnpermuteCpu(ffi::ThreadPool pool, int64_t topk, ffi::AnyBuffer rows,
                        ffi::AnyBuffer positions, ffi::AnyBuffer weights,
                        ffi::Result<ffi::AnyBuffer> out) {
  RowsProblem p;
  JR_RETURN_IF_ERROR(MakeUnpermuteProblem(p, topk, rows, positions, weights, *out));
  if (p.tokens == 0 || p.hidden == 0) return ffi::Error::Success();
  return DispatchFloat(p.dtype, [&](auto tag) {
    ParallelRows(&pool, p.tokens, p.hidden * p.topk, [&](int64_t t0, int64_t t1) {
      UnpermuteTokens<decltype(tag)>(p, t0, t1);
    });
  });
}

// dweights[s] = dot(dout[s / k], rows[positions[s]]) in dispatch_math.h's order.
template <typename T, typename W>
void DotSlots(const RowsProblem& p, int64_t s0, int64_t s1) {
  const int64_t H = p.hidden;
  const T* dout = static_cast<const T*>(p.x);
  const T* rows = static_cast<const T*>(p.rows_in);
  W* dw = static_cast<W*>(p.out);
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t r = p.index[s];
    if (!dispatch::in_range(r, p.rows)) {
      dw[s] = FromFloat<W>(0.0f);
      continue;
    }
    const T* a = dout + (s / p.topk) * H;
    const T* b = rows + r * H;
    float part[exact::kSumLanes] = {};
    int64_t h0 = 0;
    for (; h0 + exact::kSumLanes <= H; h0 += exact::kSumLanes) {
      for (int l = 0; l < exact::kSumLanes; ++l) {
        part[l] = dispatch::dot_step(part[l], ToFloat(a[h0 + l]), ToFloat(b[h0 + l]));
      }
    }
    for (int64_t h = h0; h < H; ++h) {
      part[h - h0] = dispatch::dot_step(part[h - h0], ToFloat(a[h]), ToFloat(b[h]));
    }
    dw[s] = FromFloat<W>(exact::combine_partials(part));
  }
}

ffi::Error UnpermuteBwdCpu(ffi::ThreadPool pool, int64_t topk, ffi::AnyBuffer dout,
                           ffi::AnyBuffer rows, ffi::AnyBuffer positions,
                           ffi::Result<ffi::AnyBuffer> dweights) {
  RowsProblem p;
  JR_RETURN_IF_ERROR(MakeUnpermuteBwdProblem(p, topk, dout, rows, positions, *dweights));
  const int64_t slots = p.tokens * p.topk;
  if (slots == 0) return ffi::Error::Success();
  return DispatchFloatPair(p.dtype, p.out_dtype, [&](auto tag, auto wtag) {
    ParallelRows(&pool, slots, std::max<int64_t>(p.hidden, 1), [&](int64_t s0, int64_t s1) {
      DotSlots<decltype(tag), decltype(wtag)>(p, s0, s1);
    });
  });
}

}  // namespace
}  // namespace jax_router

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterDispatchPlanCpu, jax_router::PlanCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("capacity")
                                  .Arg<xla::ffi::AnyBuffer>()  // topk_indices
                                  .Ret<xla::ffi::AnyBuffer>()  // tokens_per_expert
                                  .Ret<xla::ffi::AnyBuffer>()  // positions
                                  .Ret<xla::ffi::AnyBuffer>()  // source
                                  .Ret<xla::ffi::AnyBuffer>()  // workspace
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterPermuteCpu, jax_router::PermuteCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attr<int64_t>("topk")
                                  .Arg<xla::ffi::AnyBuffer>()  // x
                                  .Arg<xla::ffi::AnyBuffer>()  // source
                                  .Arg<xla::ffi::AnyBuffer>()  // weights or [0]
                                  .Ret<xla::ffi::AnyBuffer>()  // rows
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterUnpermuteCpu, jax_router::UnpermuteCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attr<int64_t>("topk")
                                  .Arg<xla::ffi::AnyBuffer>()  // rows
                                  .Arg<xla::ffi::AnyBuffer>()  // positions
                                  .Arg<xla::ffi::AnyBuffer>()  // weights or [0]
                                  .Ret<xla::ffi::AnyBuffer>()  // out
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterUnpermuteBwdCpu, jax_router::UnpermuteBwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attr<int64_t>("topk")
                                  .Arg<xla::ffi::AnyBuffer>()  // dout
                                  .Arg<xla::ffi::AnyBuffer>()  // rows
                                  .Arg<xla::ffi::AnyBuffer>()  // positions
                                  .Ret<xla::ffi::AnyBuffer>()  // dweights
);
