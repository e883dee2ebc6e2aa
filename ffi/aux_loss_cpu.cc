// CPU handlers for the aux-loss scores (SPEC §2.3):
//
// jax_router_aux_scores_fwd(logits [T,E]) -> (scores f32 [T,E], map bool[T,E] | u8[T,ceil(E/8)])
//   attrs: topk (i64), score_function (i64, router.h ScoreFn), bitmap (bool)
// jax_router_aux_scores_bwd(grad_scores f32 [T,E], logits [T,E]) -> grad_logits [T,E]
//   attrs: score_function (i64)
//
// Per row: softmax -> scores = softmax(x) over all E; sigmoid / sqrtsoftplus -> s = act(x) and
// scores = s / (sum_{all E} s + eps) (whatever topk). The map marks the topk largest scores in
// SPEC order (order keys of router.h, ties to the lower id). The backward recomputes s from the
// logits (the only residual) and applies
//   softmax:       dx = s (g - sum_e g_e s_e)
//   sigmoid/ssp:   ds = (g - sum_e g_e p_e) / (A + eps),  dx = ds * activation_grad(s)
// with p = scores and A = sum_e s_e, i.e. g / (A + eps) - B / (A + eps)^2, B = sum_e g_e s_e.
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_util.h"
#include "ffi_common.h"
#include "router.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_router {
namespace {

ffi::Error DecodeScoreFn(int64_t v, ScoreFn* out) {
  if (v < 0 || v > 2) return Invalid("unknown score_function");
  *out = static_cast<ScoreFn>(v);
  return ffi::Error::Success();
}

// s = activation(x) over the whole row (softmax: the row's softmax). Returns sum_e s_e for the
// element-wise functions (0 for softmax, which needs no normalisation).
inline float AuxActivation(ScoreFn fn, const float* x, float* s, int64_t E) {
  if (fn == ScoreFn::kSoftmax) {
    Softmax(x, s, E);
    return 0.0f;
  }
  if (fn == ScoreFn::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + VecExp(-x[e]));
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = activation(fn, x[e]);
  }
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) sum += s[e];
  return sum;
}

struct AuxFwd {
  int64_t rows, experts, topk;
  ScoreFn fn;
  bool bitmap;
  const void* logits;
  float* scores;
  uint8_t* map;
};

template <typename T>
void AuxForwardRows(const AuxFwd& f, int64_t r0, int64_t r1) {
  const int64_t E = f.experts, K = f.topk;
  std::vector<float> x(E), s(E);
  std::vector<uint32_t> key(E);
  std::vector<uint64_t> sel(K), tmp;
  const int64_t mbytes = f.bitmap ? bitmap_bytes(E) : E;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = static_cast<const T*>(f.logits) + r * E;
    for (int64_t e = 0; e < E; ++e) x[e] = ToFloat(xr[e]);
    float* out = f.scores + r * E;
    const float A = AuxActivation(f.fn, x.data(), s.data(), E);
    if (f.fn == ScoreFn::kSoftmax) {
      for (int64_t e = 0; e < E; ++e) out[e] = s[e];
    } else {
      for (int64_t e = 0; e < E; ++e) out[e] = s[e] / (A + kEps);
    }
    for (int64_t e = 0; e < E; ++e) key[e] = order_key(out[e]);
    SelectTopK(key.data(), 0, E, K, sel.data(), tmp);
    uint8_t* mr = f.map + r * mbytes;
    std::memset(mr, 0, mbytes);
    for (int64_t j = 0; j < K; ++j) {
      const uint32_t e = slot_expert(sel[j]);
      if (f.bitmap) {
        mr[e >> 3] |= static_cast<uint8_t>(1u << (e & 7u));
      } else {
        mr[e] = 1;
      }
    }
  }
}

struct AuxBwd {
  int64_t rows, experts;
  ScoreFn fn;
  const float* grad;
  const void* logits;
  ffi::DataType logits_dtype;
  void* grad_logits;
};

template <typename T>
void AuxBackwardRows(const AuxBwd& b, int64_t r0, int64_t r1) {
  const int64_t E = b.experts;
  std::vector<float> x(E), s(E);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = static_cast<const T*>(b.logits) + r * E;
    for (int64_t e = 0; e < E; ++e) x[e] = ToFloat(xr[e]);
    const float* g = b.grad + r * E;
    T* out = static_cast<T*>(b.grad_logits) + r * E;
    const float A = AuxActivation(b.fn, x.data(), s.data(), E);
    if (b.fn == ScoreFn::kSoftmax) {
      float D = 0.0f;
      for (int64_t e = 0; e < E; ++e) D += g[e] * s[e];
      for (int64_t e = 0; e < E; ++e) out[e] = FromFloat<T>(s[e] * (g[e] - D));
    } else {
      const float inv = 1.0f / (A + kEps);
      float Bp = 0.0f;  // sum_e g_e p_e = B / (A + eps)
      for (int64_t e = 0; e < E; ++e) Bp += g[e] * (s[e] / (A + kEps));
      for (int64_t e = 0; e < E; ++e) {
        const float ds = (g[e] - Bp) * inv;
        out[e] = FromFloat<T>(ds * activation_grad(b.fn, s[e]));
      }
    }
  }
}

ffi::Error AuxScoresFwdCpu(ffi::ThreadPool pool, int64_t topk, int64_t score_function,
                           bool bitmap, ffi::AnyBuffer logits,
                           ffi::Result<ffi::AnyBuffer> scores, ffi::Result<ffi::AnyBuffer> map) {
  AuxFwd f{};
  if (!IsFloatDtype(logits.element_type())) return Invalid("logits must be f32/bf16/f16");
  if (logits.dimensions().size() < 1) return Invalid("logits must have rank >= 1");
  f.experts = LastDim(logits);
  if (f.experts < 1) return Invalid("logits must have at least one expert");
  f.rows = static_cast<int64_t>(logits.element_count()) / f.experts;
  if (topk < 1 || topk > f.experts) return Invalid("topk must lie in [1, E]");
  f.topk = topk;
  JR_RETURN_IF_ERROR(DecodeScoreFn(score_function, &f.fn));
  f.bitmap = bitmap;
  if (scores->element_type() != ffi::DataType::F32 ||
      static_cast<int64_t>(scores->element_count()) != f.rows * f.experts) {
    return Invalid("aux scores must be f32 [T, E]");
  }
  const int64_t mbytes = bitmap ? bitmap_bytes(f.experts) : f.experts;
  if (map->element_type() != (bitmap ? ffi::DataType::U8 : ffi::DataType::PRED) ||
      static_cast<int64_t>(map->element_count()) != f.rows * mbytes) {
    return Invalid("aux routing_map must be bool [T, E] (bytemap) or uint8 [T, ceil(E/8)]");
  }
  if (f.rows == 0) return ffi::Error::Success();
  f.logits = logits.untyped_data();
  f.scores = static_cast<float*>(scores->untyped_data());
  f.map = static_cast<uint8_t*>(map->untyped_data());
  return DispatchFloat(logits.element_type(), [&](auto tag) {
    using T = decltype(tag);
    ParallelRows(&pool, f.rows, 8 * f.experts,
                 [&](int64_t r0, int64_t r1) { AuxForwardRows<T>(f, r0, r1); });
  });
}

ffi::Error AuxScoresBwdCpu(ffi::ThreadPool pool, int64_t score_function, ffi::AnyBuffer grad,
                           ffi::AnyBuffer logits, ffi::Result<ffi::AnyBuffer> grad_logits) {
  AuxBwd b{};
  if (!IsFloatDtype(logits.element_type())) return Invalid("logits must be f32/bf16/f16");
  if (grad_logits->element_type() != logits.element_type()) {
    return Invalid("grad_logits dtype must equal the logits dtype");
  }
  b.experts = LastDim(logits);
  if (b.experts < 1) return Invalid("logits must have at least one expert");
  b.rows = static_cast<int64_t>(logits.element_count()) / b.experts;
  JR_RETURN_IF_ERROR(DecodeScoreFn(score_function, &b.fn));
  const int64_t n = b.rows * b.experts;
  if (grad.element_type() != ffi::DataType::F32 ||
      static_cast<int64_t>(grad.element_count()) != n) {
    return Invalid("aux grad_scores must be f32 [T, E]");
  }
  if (static_cast<int64_t>(grad_logits->element_count()) != n) {
    return Invalid("grad_logits must be [T, E]");
  }
  if (b.rows == 0) return ffi::Error::Success();
  b.grad = static_cast<const float*>(grad.untyped_data());
  b.logits = logits.untyped_data();
  b.logits_dtype = logits.element_type();
  b.grad_logits = grad_logits->untyped_data();
  return DispatchFloat(b.logits_dtype, [&](auto tag) {
    using T = decltype(tag);
    ParallelRows(&pool, b.rows, 8 * b.experts,
                 [&](int64_t r0, int64_t r1) { AuxBackwardRows<T>(b, r0, r1); });
  });
}

}  // namespace
}  // namespace jax_router

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterAuxScoresFwdCpu, jax_router::AuxScoresFwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attr<int64_t>("topk")
                                  .Attr<int64_t>("score_function")
                                  .Attr<bool>("bitmap")
                                  .Arg<xla::ffi::AnyBuffer>()  // logits
                                  .Ret<xla::ffi::AnyBuffer>()  // scores
                                  .Ret<xla::ffi::AnyBuffer>()  // routing map
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterAuxScoresBwdCpu, jax_router::AuxScoresBwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attr<int64_t>("score_function")
                                  .Arg<xla::ffi::AnyBuffer>()  // grad_scores (f32)
                                  .Arg<xla::ffi::AnyBuffer>()  // logits
                                  .Ret<xla::ffi::AnyBuffer>()  // grad_logits
);
