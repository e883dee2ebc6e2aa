// The FFI contract of the aux-loss score targets (SPEC §2.3), shared by the CPU handlers
// (aux_loss_cpu.cc) and the CUDA handlers (aux_loss_cuda.cu):
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
#pragma once

#include <cstdint>

#include "ffi_common.h"
#include "router.h"
#include "xla/ffi/api/ffi.h"

namespace jax_router {

struct AuxFwd {
  int64_t rows, experts, topk;
  ScoreFn fn;
  bool bitmap;
  const void* logits;
  ffi::DataType logits_dtype;
  float* scores;
  uint8_t* map;
};

struct AuxBwd {
  int64_t rows, experts;
  ScoreFn fn;
  const float* grad;
  const void* logits;
  ffi::DataType logits_dtype;
  void* grad_logits;
};

inline ffi::Error DecodeScoreFn(int64_t v, ScoreFn* out) {
  if (v < 0 || v > 2) return Invalid("unknown score_function");
  *out = static_cast<ScoreFn>(v);
  return ffi::Error::Success();
}

inline ffi::Error MakeAuxFwd(AuxFwd& f, int64_t topk, int64_t score_function, bool bitmap,
                             const ffi::AnyBuffer& logits, const ffi::AnyBuffer& scores,
                             const ffi::AnyBuffer& map) {
  f = AuxFwd{};
  if (!IsFloatDtype(logits.element_type())) return Invalid("logits must be f32/bf16/f16");
  if (logits.dimensions().size() < 1) return Invalid("logits must have rank >= 1");
  f.experts = LastDim(logits);
  if (f.experts < 1) return Invalid("logits must have at least one expert");
  f.rows = static_cast<int64_t>(logits.element_count()) / f.experts;
  if (topk < 1 || topk > f.experts) return Invalid("topk must lie in [1, E]");
  f.topk = topk;
  JR_RETURN_IF_ERROR(DecodeScoreFn(score_function, &f.fn));
  f.bitmap = bitmap;
  if (scores.element_type() != ffi::DataType::F32 ||
      static_cast<int64_t>(scores.element_count()) != f.rows * f.experts) {
    return Invalid("aux scores must be f32 [T, E]");
  }
  const int64_t mbytes = bitmap ? bitmap_bytes(f.experts) : f.experts;
  if (map.element_type() != (bitmap ? ffi::DataType::U8 : ffi::DataType::PRED) ||
      static_cast<int64_t>(map.element_count()) != f.rows * mbytes) {
    return Invalid("aux routing_map must be bool [T, E] (bytemap) or uint8 [T, ceil(E/8)]");
  }
  f.logits = logits.untyped_data();
  f.logits_dtype = logits.element_type();
  f.scores = static_cast<float*>(scores.untyped_data());
  f.map = static_cast<uint8_t*>(map.untyped_data());
  return ffi::Error::Success();
}

inline ffi::Error MakeAuxBwd(AuxBwd& b, int64_t score_function, const ffi::AnyBuffer& grad,
                             const ffi::AnyBuffer& logits, const ffi::AnyBuffer& grad_logits) {
  b = AuxBwd{};
  if (!IsFloatDtype(logits.element_type())) return Invalid("logits must be f32/bf16/f16");
  if (grad_logits.element_type() != logits.element_type()) {
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
  if (static_cast<int64_t>(grad_logits.element_count()) != n) {
    return Invalid("grad_logits must be [T, E]");
  }
  b.grad = static_cast<const float*>(grad.untyped_data());
  b.logits = logits.untyped_data();
  b.logits_dtype = logits.element_type();
  b.grad_logits = grad_logits.untyped_data();
  return ffi::Error::Success();
}

}  // namespace jax_router
