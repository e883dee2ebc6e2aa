// CPU handlers for the aux-score targets (contract: ffi_contract.h; math: routing_math.h).
// One routine per row, row ranges split across XLA's intra-op thread pool (cpu_util.h).
//
// Per row: softmax -> scores = softmax(x) over all E; element-wise functions -> s = act(x),
// A = sum_e s_e and scores = s / (A + eps) (whatever topk). The map marks the topk largest
// scores (order keys, ties to the lower id). Row sums run in exact_math.h's fixed order, so
// the CUDA kernels give the same bits. The backward recomputes s from the logits (the only
// residual): softmax dx = s (g - D), D = sum_e g_e s_e; element-wise dx = normalised_grad(g, A, B)
// * activation_grad(s) with B = sum_e g_e s_e, as the router's backward over all E experts.
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_util.h"
#include "ffi_contract.h"
#include "routing_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_router {
namespace {

// s = activation(x) over the whole row (softmax: the row's softmax). Returns sum_e s_e for the
// element-wise functions (unused for softmax, which needs no normalisation).
template <ScoreFn F>
inline float AuxActivation(const float* x, float* s, int64_t E) {
  if constexpr (F == ScoreFn::kSoftmax) {
    Softmax(x, s, E);
    return 0.0f;
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = activation<F>(x[e]);
    return RowSum(s, E);
  }
}

template <typename T, ScoreFn F>
void AuxForwardRows(const AuxFwd& f, int64_t r0, int64_t r1) {
  const int64_t E = f.experts, K = f.topk;
  std::vector<float> x(E), s(E);
  std::vector<uint32_t> key(E);
  std::vector<uint64_t> sel(K), tmp;
  const bool bitmap = f.map_format == MapFormat::kBitmapU8;
  const int64_t mbytes = map_bytes_per_row(f.map_format, E);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = static_cast<const T*>(f.logits) + r * E;
    for (int64_t e = 0; e < E; ++e) x[e] = ToFloat(xr[e]);
    float* out = f.scores + r * E;
    const float A = AuxActivation<F>(x.data(), s.data(), E);
    const float d = weight_denominator<F>(A);
    for (int64_t e = 0; e < E; ++e) {
      const float sc = IsElementwise(F) ? s[e] / d : s[e];
      key[e] = order_key(sc);
      out[e] = exact::canonical(sc);
    }
    SelectTopK(key.data(), 0, E, K, sel.data(), tmp);
    uint8_t* mr = f.map + r * mbytes;
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
}

template <typename T, ScoreFn F>
void AuxBackwardRows(const AuxBwd& b, int64_t r0, int64_t r1) {
  const int64_t E = b.experts;
  std::vector<float> x(E), s(E), gs(E);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = static_cast<const T*>(b.logits) + r * E;
    for (int64_t e = 0; e < E; ++e) x[e] = ToFloat(xr[e]);
    const float* g = b.grad + r * E;
    T* out = static_cast<T*>(b.grad_logits) + r * E;
    const float A = AuxActivation<F>(x.data(), s.data(), E);
    for (int64_t e = 0; e < E; ++e) gs[e] = g[e] * s[e];
    const float B = RowSum(gs.data(), E);  // D for softmax
    for (int64_t e = 0; e < E; ++e) {
      out[e] = FromFloat<T>(IsElementwise(F)
                                ? normalised_grad(g[e], A, B) * activation_grad<F>(s[e])
                                : softmax_grad(s[e], g[e], B));
    }
  }
}

ffi::Error AuxScoresFwdCpu(ffi::ThreadPool pool, AuxAttrs attrs, ffi::AnyBuffer logits,
                           ffi::Result<ffi::AnyBuffer> scores, ffi::Result<ffi::AnyBuffer> map) {
  AuxFwd f;
  JR_RETURN_IF_ERROR(MakeAuxFwd(f, attrs, logits, *scores, *map));
  if (f.rows == 0) return ffi::Error::Success();
  return DispatchFloat(f.logits_dtype, [&](auto tag) {
    using T = decltype(tag);
    DispatchScoreFn(f.fn, [&](auto fn) {
      ParallelRows(&pool, f.rows, 8 * f.experts, [&](int64_t r0, int64_t r1) {
        AuxForwardRows<T, decltype(fn)::value>(f, r0, r1);
      });
    });
  });
}

ffi::Error AuxScoresBwdCpu(ffi::ThreadPool pool, ScoreFn score_function, ffi::AnyBuffer grad,
                           ffi::AnyBuffer logits, ffi::Result<ffi::AnyBuffer> grad_logits) {
  AuxBwd b;
  JR_RETURN_IF_ERROR(MakeAuxBwd(b, score_function, grad, logits, *grad_logits));
  if (b.rows == 0) return ffi::Error::Success();
  return DispatchFloat(b.logits_dtype, [&](auto tag) {
    using T = decltype(tag);
    DispatchScoreFn(b.fn, [&](auto fn) {
      ParallelRows(&pool, b.rows, 8 * b.experts, [&](int64_t r0, int64_t r1) {
        AuxBackwardRows<T, decltype(fn)::value>(b, r0, r1);
      });
    });
  });
}

}  // namespace
}  // namespace jax_router

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterAuxScoresFwdCpu, jax_router::AuxScoresFwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attrs<AuxAttrs>()
                                  .Arg<xla::ffi::AnyBuffer>()  // logits
                                  .Ret<xla::ffi::AnyBuffer>()  // scores
                                  .Ret<xla::ffi::AnyBuffer>()  // routing map
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterAuxScoresBwdCpu, jax_router::AuxScoresBwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attr<jax_router::ScoreFn>("score_function")
                                  .Arg<xla::ffi::AnyBuffer>()  // grad_scores (f32)
                                  .Arg<xla::ffi::AnyBuffer>()  // logits
                                  .Ret<xla::ffi::AnyBuffer>()  // grad_logits
);
