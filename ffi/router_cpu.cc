// CPU handlers for jax_router_fwd / jax_router_qb_fwd / jax_router_bwd (contract: ffi_contract.h).
//
// One routine per row, called for row ranges split across XLA's intra-op thread pool. Every
// formula comes from routing_math.h, shared with the CUDA kernels; the CPU helpers
// (conversion, ParallelRows, Softmax, SelectTopK) live in cpu_util.h.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_util.h"
#include "ffi_contract.h"
#include "routing_math.h"
#include "router_cpu_avx512.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_router {
namespace {

inline int64_t LoadIndex(const void* p, ffi::DataType t, int64_t i) {
  switch (t) {
    case ffi::DataType::S16:
      return static_cast<const int16_t*>(p)[i];
    case ffi::DataType::S32:
      return static_cast<const int32_t*>(p)[i];
    case ffi::DataType::S64:
      return static_cast<const int64_t*>(p)[i];
    default:
      return -1;  // MakeBwdProblem admits only the three above; -1 is skipped
  }
}

struct RowScratch {
  std::vector<float> x, s, z;
  std::vector<uint32_t> key, group_key;
  std::vector<uint64_t> sel, group_sel, tmp;
  std::vector<char> keep;
  RowScratch(int64_t E, int64_t k, int64_t groups)
      : x(E), s(E), z(E), key(E), group_key(std::max<int64_t>(groups, 1)), sel(k + 1),
        group_sel(std::max<int64_t>({groups, k, int64_t{1}})), keep(groups) {}
};

// Routes one row whose float32 logits are in w.x; sel receives the selected slot keys in slot
// order (with quantile balancing one more: slot topk, the cutoff's) and p the weights before
// scaling. Two builds, chosen at load time by the CPU's
// features, so that the score loops use 8-wide vectors and fused multiply-adds where they
// exist (the results are the same: every fma is explicit and nothing else is contracted).
template <ScoreFn F>
__attribute__((target_clones("arch=haswell", "default"))) void RouteRow(const FwdProblem& f,
                                                                          const float* bias,
                                                                          RowScratch& w,
                                                                          float* p) {
  const RouteParams& P = f.p;
  const int64_t E = f.experts, K = P.topk;
  ScoreRow<F>(P.pre_softmax, w.x.data(), bias, E, w.s.data(), w.z.data(), w.key.data());

  if (P.group_topk > 0) {
    const int64_t G = P.num_groups, gsize = E / G, m = K / P.group_topk;
    for (int64_t g = 0; g < G; ++g) {
      SelectTopK(w.key.data(), g * gsize, gsize, m, w.group_sel.data(), w.tmp);
      float score = w.z[slot_expert(w.group_sel[0])];
      for (int64_t j = 1; j < m; ++j) score = group_score_add(score, w.z[slot_expert(w.group_sel[j])]);
      w.group_key[g] = order_key(score);
    }
    SelectTopK(w.group_key.data(), 0, G, P.group_topk, w.group_sel.data(), w.tmp);
    std::fill(w.keep.begin(), w.keep.end(), 0);
    for (int64_t j = 0; j < P.group_topk; ++j) w.keep[slot_expert(w.group_sel[j])] = 1;
    for (int64_t g = 0; g < G; ++g) {
      if (!w.keep[g]) std::fill_n(w.key.begin() + g * gsize, gsize, kExcludedKey);
    }
  }
  SelectTopK(w.key.data(), 0, E, ranked_count(P), w.sel.data(), w.tmp);
  Weights<F>(P, w.sel.data(), w.x.data(), w.s.data(), p);
}

// Quantile balancing of one routed row: its cutoff (the score of slot topk) and one histogram
// count per expert. Rows run on several threads, hence the atomic increments (integers: the
// counts are exact whatever the order).
void QbRow(const FwdProblem& f, int64_t r, const RowScratch& w, float lower, float scale) {
  const int64_t E = f.experts, nb = f.p.num_bins;
  const float cutoff = order_key_value(static_cast<uint32_t>(w.sel[f.p.topk] >> 32));
  f.cutoff[r] = exact::canonical(cutoff);
  for (int64_t e = 0; e < E; ++e) {
    __atomic_fetch_add(&f.histogram[e * nb + qb_bin(cutoff, w.s[e], lower, scale, nb)], 1,
                       __ATOMIC_RELAXED);
  }
}

template <typename I>
void StoreIndices(void* out, int64_t at, const uint64_t* sel, int64_t K) {
  for (int64_t j = 0; j < K; ++j) static_cast<I*>(out)[at + j] = static_cast<I>(slot_expert(sel[j]));
}

template <typename T, ScoreFn F>
void ForwardRows(const FwdProblem& f, int64_t r0, int64_t r1) {
  const int64_t E = f.experts, K = f.p.topk;
  RowScratch w(E, K, f.p.num_groups);
  std::vector<float> p(K);
  const bool bitmap = f.map_format == MapFormat::kBitmapU8;
  const int64_t mbytes = map_bytes_per_row(f.map_format, E);
  auto write = [&](int64_t r, const uint64_t* sel, const float* pr_, const float* s) {
    if (f.probs) {
      T* pr = static_cast<T*>(f.probs) + r * E;
      // +0 is all zero bits in every float type; std::fill on the BF16 struct stored 2 bytes
      // at a time.
      std::memset(pr, 0, E * sizeof(T));
      for (int64_t j = 0; j < K; ++j) pr[slot_expert(sel[j])] = FromFloat<T>(f.p.scaling * pr_[j]);
    }
    if (f.map) {
      uint8_t* mr = static_cast<uint8_t*>(f.map) + r * mbytes;
      std::memset(mr, 0, mbytes);
      for (int64_t j = 0; j < K; ++j) {
        const uint32_t e = slot_expert(sel[j]);
        if (bitmap) {
          mr[e >> 3] |= static_cast<uint8_t>(1u << (e & 7u));
        } else {
          mr[e] = 1;
        }
      }
    }
    // One loop per output, so that each is a plain loop the compiler vectorises.
    if (f.weights) {
      for (int64_t j = 0; j < K; ++j) f.weights[r * K + j] = exact::canonical(f.p.scaling * pr_[j]);
    }
    if (f.indices) {
      switch (f.index_dtype) {
        case ffi::DataType::S16:
          StoreIndices<int16_t>(f.indices, r * K, sel, K);
          break;
        case ffi::DataType::S32:
          StoreIndices<int32_t>(f.indices, r * K, sel, K);
          break;
        case ffi::DataType::S64:
          StoreIndices<int64_t>(f.indices, r * K, sel, K);
          break;
        default:
          break;  // MakeFwdProblem admits only the three above
      }
    }
    if (f.act) {
      for (int64_t j = 0; j < K; ++j) {
        f.act[r * K + j] = exact::canonical(residual<F>(f.p.pre_softmax, pr_[j], s[slot_expert(sel[j])]));
      }
    }
  };
  if (avx512::Available() && avx512::Supports(f)) {
    avx512::RouteRows<T, F>(f, r0, r1, w.sel.data(), p.data(), w.tmp, write);
    return;
  }
  const bool qb = is_qb(f.p);
  const float lower = qb ? f.bin_bounds[0] : 0.0f;
  const float scale = qb ? qb_scale(f.p.num_bins, lower, f.bin_bounds[1]) : 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = static_cast<const T*>(f.logits) + r * E;
    for (int64_t e = 0; e < E; ++e) w.x[e] = ToFloat(xr[e]);
    RouteRow<F>(f, f.bias ? f.bias + (r / f.rows_per_bias) * E : nullptr, w, p.data());
    write(r, w.sel.data(), p.data(), w.s.data());
    if (qb) QbRow(f, r, w, lower, scale);
  }
}

template <typename T, typename G, ScoreFn F>
void BackwardRows(const BwdProblem& b, int64_t r0, int64_t r1) {
  const RouteParams& P = b.p;
  const int64_t E = b.experts, K = P.topk;
  std::vector<float> dx(E), x, s;
  std::vector<float> gh(K), a(K);
  std::vector<int64_t> idx(K);
  const bool pre = F == ScoreFn::kSoftmax && P.pre_softmax;
  if (pre) {
    x.resize(E);
    s.resize(E);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const G* g = static_cast<const G*>(b.grad) + r * (b.dense_grad ? E : K);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = LoadIndex(b.indices, b.index_dtype, r * K + j);
      // Indices come from the forward; anything else is skipped rather than written out of
      // bounds.
      idx[j] = (e >= 0 && e < E) ? e : -1;
      gh[j] = idx[j] < 0 ? 0.0f : P.scaling * ToFloat(g[b.dense_grad ? idx[j] : j]);
      a[j] = b.act[r * K + j];
    }
    if (pre) {
      DispatchFloat(b.logits_dtype, [&](auto tag) {
        using L = decltype(tag);
        const L* xr = static_cast<const L*>(b.logits) + r * E;
        for (int64_t e = 0; e < E; ++e) x[e] = ToFloat(xr[e]);
      });
      Softmax(x.data(), s.data(), E);
      float D = 0.0f;
      for (int64_t j = 0; j < K; ++j) D = dot_add(D, gh[j], idx[j] < 0 ? 0.0f : s[idx[j]]);
      for (int64_t e = 0; e < E; ++e) dx[e] = softmax_grad(s[e], 0.0f, D);
      for (int64_t j = 0; j < K; ++j) {
        if (idx[j] >= 0) dx[idx[j]] = softmax_grad(s[idx[j]], gh[j], D);
      }
    } else {
      float A = 0.0f, B = 0.0f;
      for (int64_t j = 0; j < K; ++j) {
        A = j == 0 ? a[j] : slot_sum_add(A, a[j]);
        B = dot_add(B, gh[j], a[j]);
      }
      std::fill(dx.begin(), dx.end(), 0.0f);
      for (int64_t j = 0; j < K; ++j) {
        if (idx[j] >= 0) dx[idx[j]] = grad_logit<F>(K, gh[j], a[j], A, B);
      }
    }
    T* out = static_cast<T*>(b.grad_logits) + r * E;
    for (int64_t e = 0; e < E; ++e) out[e] = FromFloat<T>(dx[e]);
  }
}

ffi::Error Forward(ffi::ThreadPool& pool, const FwdProblem& f) {
  if (f.rows == 0) return ffi::Error::Success();
  return DispatchFloat(f.logits_dtype, [&](auto tag) {
    using T = decltype(tag);
    DispatchScoreFn(f.p.score_fn, [&](auto fn) {
      ParallelRows(&pool, f.rows, 8 * f.experts, [&](int64_t r0, int64_t r1) {
        ForwardRows<T, decltype(fn)::value>(f, r0, r1);
      });
    });
  });
}

ffi::Error FwdCpu(ffi::ThreadPool pool, RouteAttrs attrs, ffi::AnyBuffer logits,
                  ffi::AnyBuffer bias, ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> probs,
                  ffi::Result<ffi::AnyBuffer> map, ffi::Result<ffi::AnyBuffer> weights,
                  ffi::Result<ffi::AnyBuffer> indices, ffi::Result<ffi::AnyBuffer> act) {
  FwdProblem f;
  JR_RETURN_IF_ERROR(MakeFwdProblem(f, attrs, logits, bias, *probs, *map, *weights, *indices, *act));
  JR_RETURN_IF_ERROR(CheckNotQb(f));
  return Forward(pool, f);
}

ffi::Error QbFwdCpu(ffi::ThreadPool pool, RouteAttrs attrs, ffi::AnyBuffer logits,
                    ffi::AnyBuffer bias, ffi::AnyBuffer bin_bounds, ffi::AnyBuffer hist_in,
                    ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> probs,
                    ffi::Result<ffi::AnyBuffer> map, ffi::Result<ffi::AnyBuffer> weights,
                    ffi::Result<ffi::AnyBuffer> indices, ffi::Result<ffi::AnyBuffer> act,
                    ffi::Result<ffi::AnyBuffer> cutoff, ffi::Result<ffi::AnyBuffer> hist_out) {
  FwdProblem f;
  const int32_t* copy_from;
  JR_RETURN_IF_ERROR(MakeQbFwdProblem(f, attrs, logits, bias, bin_bounds, hist_in, *probs, *map,
                                      *weights, *indices, *act, *cutoff, *hist_out, &copy_from));
  if (copy_from) {  // not aliased: start from the given counts
    std::memcpy(f.histogram, copy_from, hist_out->element_count() * sizeof(int32_t));
  }
  return Forward(pool, f);
}

ffi::Error BwdCpu(ffi::ThreadPool pool, RouteAttrs attrs, ffi::AnyBuffer grad,
                  ffi::AnyBuffer indices, ffi::AnyBuffer act, ffi::AnyBuffer logits,
                  ffi::Result<ffi::AnyBuffer> grad_logits) {
  BwdProblem b;
  JR_RETURN_IF_ERROR(MakeBwdProblem(b, attrs, grad, indices, act, logits, *grad_logits));
  if (b.rows == 0) return ffi::Error::Success();
  return DispatchFloatPair(b.out_dtype, b.grad_dtype, [&](auto out_tag, auto grad_tag) {
    using T = decltype(out_tag);
    using G = decltype(grad_tag);
    DispatchScoreFn(b.p.score_fn, [&](auto fn) {
      ParallelRows(&pool, b.rows, 2 * b.experts, [&](int64_t r0, int64_t r1) {
        BackwardRows<T, G, decltype(fn)::value>(b, r0, r1);
      });
    });
  });
}

}  // namespace
}  // namespace jax_router

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterFwdCpu, jax_router::FwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attrs<RouteAttrs>()
                                  .Arg<xla::ffi::AnyBuffer>()  // logits
                                  .Arg<xla::ffi::AnyBuffer>()  // expert_bias
                                  .RemainingArgs()             // caller's indices buffer (aliased)
                                  .Ret<xla::ffi::AnyBuffer>()  // probs
                                  .Ret<xla::ffi::AnyBuffer>()  // routing map
                                  .Ret<xla::ffi::AnyBuffer>()  // weights
                                  .Ret<xla::ffi::AnyBuffer>()  // indices
                                  .Ret<xla::ffi::AnyBuffer>()  // act (residual)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterQbFwdCpu, jax_router::QbFwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attrs<RouteAttrs>()
                                  .Arg<xla::ffi::AnyBuffer>()  // logits
                                  .Arg<xla::ffi::AnyBuffer>()  // expert_bias
                                  .Arg<xla::ffi::AnyBuffer>()  // bin_bounds
                                  .Arg<xla::ffi::AnyBuffer>()  // histogram (aliased)
                                  .RemainingArgs()             // caller's indices buffer (aliased)
                                  .Ret<xla::ffi::AnyBuffer>()  // probs
                                  .Ret<xla::ffi::AnyBuffer>()  // routing map
                                  .Ret<xla::ffi::AnyBuffer>()  // weights
                                  .Ret<xla::ffi::AnyBuffer>()  // indices
                                  .Ret<xla::ffi::AnyBuffer>()  // act (residual)
                                  .Ret<xla::ffi::AnyBuffer>()  // cutoff
                                  .Ret<xla::ffi::AnyBuffer>()  // histogram
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterBwdCpu, jax_router::BwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attrs<RouteAttrs>()
                                  .Arg<xla::ffi::AnyBuffer>()  // grad (probs or weights cotangent)
                                  .Arg<xla::ffi::AnyBuffer>()  // indices
                                  .Arg<xla::ffi::AnyBuffer>()  // act
                                  .Arg<xla::ffi::AnyBuffer>()  // logits (pre-softmax) or empty
                                  .Ret<xla::ffi::AnyBuffer>()  // grad_logits
);
