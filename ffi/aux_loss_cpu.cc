// CPU handlers for the aux-loss score targets (contract and math: aux_loss.h). One routine
// per row, row ranges split across XLA's intra-op thread pool (cpu_util.h).
#include <cstdint>
#include <cstring>
#include <vector>

#include "aux_loss.h"
#include "cpu_util.h"
#include "ffi_common.h"
#include "router.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_router {
namespace {

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
  AuxFwd f;
  JR_RETURN_IF_ERROR(MakeAuxFwd(f, topk, score_function, bitmap, logits, *scores, *map));
  if (f.rows == 0) return ffi::Error::Success();
  return DispatchFloat(f.logits_dtype, [&](auto tag) {
    using T = decltype(tag);
    ParallelRows(&pool, f.rows, 8 * f.experts,
                 [&](int64_t r0, int64_t r1) { AuxForwardRows<T>(f, r0, r1); });
  });
}

ffi::Error AuxScoresBwdCpu(ffi::ThreadPool pool, int64_t score_function, ffi::AnyBuffer grad,
                           ffi::AnyBuffer logits, ffi::Result<ffi::AnyBuffer> grad_logits) {
  AuxBwd b;
  JR_RETURN_IF_ERROR(MakeAuxBwd(b, score_function, grad, logits, *grad_logits));
  if (b.rows == 0) return ffi::Error::Success();
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
