// Screening for the sigmoid fast forward: a cheap approximate selection score with a proven
// error bound, so that the exact score (routing_math.h, ~25 instructions an element) is
// computed only for the few experts that could be selected. The selection stays exactly
// routing_math.h's: every decision taken on approximate scores is one that no error within the
// bound could change, and the ranks among the candidates use exact slot keys.
//
// The bound. Let z_e = selection_score(sigmoid(x_e), b_e) be the exact score (float32) and
// a_e = screen_sigmoid(x_e) + b_e (float32) its screened value, with |b_e| <= beta for the row.
//   |screen_sigmoid(x) - sigmoid(x)| <= kScreenSigmoidError for every float x (NaN gives NaN);
//   each of the two additions rounds by at most 2^-24 |sum| <= 2^-24 (1 + beta);
// so |a_e - z_e| <= kScreenSigmoidError + 2^-23 (1 + beta) < screen_delta(beta) =: delta.
// Order statistics move by at most delta too: the m-th largest a of a set is within delta of
// the m-th largest z of the same set (NaN logits are NaN in both, and dropped from both).
//
// What the forward derives from it (fwd_fast_kernel, F = sigmoid):
//   - threshold: tau_a (the threshold computed from screened top-P values exactly as the exact
//     path computes tau from exact ones: a min over kept groups of their m-th value, or the
//     k-th largest of the lanes' top-P values) is within delta of tau. Every expert of the exact
//     selection has z_e >= tau, so a_e >= tau - delta >= tau_a - 2 delta: the candidates
//     {a_e >= tau_a - 2 delta} of the kept groups hold the exact selection, and the exact top k
//     of the candidates by slot key is the exact top k of the row (NOTES "next steps", item 1).
//   - kept groups: a group score is a sum of m values, so its screened score is within
//     group_delta = m delta + (rounding of the m - 1 adds, <= m^2 2^-24 (1 + beta)) of the exact
//     one. If the group_topk-th and the next screened group scores are more than 2 group_delta
//     apart, the screened ranks keep exactly the exact kept groups. Otherwise each group's
//     exact top m is recomputed from the experts with a_e >= a_(m) - 2 delta (which hold the
//     group's exact top m), and the groups are ranked on exact scores.
//   - rows where the bound says nothing (a NaN or infinite bias, |bias| so large that delta >
//     1, fewer than m non-NaN logits in a group, a screened threshold of -inf) and rows with
//     more candidates than the list holds take the exact path for every expert.
//
// kScreenSigmoidError: the PTX ISA gives tanh.approx.f32 a maximum relative error of about
// 2^-11 (so sigmoid = 0.5 + 0.5 tanh(x / 2) is within ~2^-12 absolute, plus the fma's rounding);
// the constant takes twice that, and tests/test_cross_platform.py checks every float32 input on
// the GPU it runs on (jax_router_screen_error).
#pragma once

#include <cuda_runtime.h>

namespace jax_router {
namespace cuda {

#ifndef JR_SCREEN_EX2  // a knob for benchmarks/cuda_bench.cu's A/B runs only
#define JR_SCREEN_EX2 0
#endif

#if JR_SCREEN_EX2
// 1 / (1 + 2^(-x log2 e)): ex2.approx (relative error ~2^-22) and rcp.approx (~1 ulp); the
// rounded product x log2 e adds |x| 2^-24 to the exponent, which matters only where sigmoid is
// not saturated. About 5e-7 absolute in all; the constant takes 2^-19.
constexpr float kScreenSigmoidError = 1.0f / 524288.0f;  // 2^-19
__device__ __forceinline__ float screen_sigmoid(float x) {
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * -1.44269504f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
  return r;
}
#else
constexpr float kScreenSigmoidError = 1.0f / 2048.0f;  // 2^-11

// 0.5 + 0.5 tanh(x / 2): one MUFU.TANH, a multiply and an fma.
__device__ __forceinline__ float screen_sigmoid(float x) {
  float t;
  asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(0.5f * x));
  return __fmaf_rn(0.5f, t, 0.5f);
}
#endif

// delta for a row with |bias| <= beta (2^-21 leaves a factor 4 over the 2^-23 of the bound).
// NaN or infinite for a NaN or infinite beta: callers test delta <= 1 and take the exact path
// otherwise.
__device__ __forceinline__ float screen_delta(float beta) {
  return kScreenSigmoidError + (1.0f + beta) * 0x1p-21f;
}

// group_delta for group scores of m values (see above), with the same slack.
__device__ __forceinline__ float screen_group_delta(float delta, int m, float beta) {
  return static_cast<float>(m) * delta + static_cast<float>(m * m) * (1.0f + beta) * 0x1p-22f;
}

}  // namespace cuda
}  // namespace jax_router
