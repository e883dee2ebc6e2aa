// The FFI contract of the router targets, shared by the CPU and CUDA handlers.
//
// jax_router_fwd(logits [T,E], bias f32 [nb,E] | [0], *aliased) ->
//     (probs [T,E] | [0], map bool[T,E] | u8[T,ceil(E/8)] | [0], weights f32[T,k] | [0],
//      indices s16/s32/s64[T,k] | [0], act f32[T,k] | [0])
// jax_router_bwd(grad [T,E] (dense_grad) | f32[T,k], indices [T,k], act f32[T,k],
//                logits [T,E] (pre-softmax only) | [0]) -> grad_logits [T,E]
//
// A zero-size output is not written: the Python layer asks for exactly the outputs a call
// needs. `act` is the compact residual: s[S] (the unbiased activation at the selected experts)
// for sigmoid / sqrtsoftplus / pre-softmax, the renormalised p for softmax without it. `nb`
// bias rows appear under vmap; token row r uses bias row r / (T / nb).
#pragma once

#include <cstdint>
#include <string>

#include "router.h"
#include "xla/ffi/api/ffi.h"

// Mirrored by jax_router/options.py::RouteOptions.ffi_attrs(); every field is always sent.
struct RouteAttrs {
  int64_t topk;
  int64_t score_function;
  bool use_pre_softmax;
  int64_t num_groups;
  int64_t group_topk;
  float scaling_factor;
  bool bitmap;
  bool dense_grad;
};

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(RouteAttrs, ::xla::ffi::StructMember<int64_t>("topk"),
                                      ::xla::ffi::StructMember<int64_t>("score_function"),
                                      ::xla::ffi::StructMember<bool>("use_pre_softmax"),
                                      ::xla::ffi::StructMember<int64_t>("num_groups"),
                                      ::xla::ffi::StructMember<int64_t>("group_topk"),
                                      ::xla::ffi::StructMember<float>("scaling_factor"),
                                      ::xla::ffi::StructMember<bool>("bitmap"),
                                      ::xla::ffi::StructMember<bool>("dense_grad"));

namespace jax_router {

namespace ffi = xla::ffi;

// A routing forward call with every buffer checked against [rows, experts] and topk.
struct FwdProblem {
  int64_t rows;
  int64_t experts;
  RouteParams p;
  const void* logits;
  ffi::DataType logits_dtype;
  const float* bias;  // nullptr: no bias
  int64_t rows_per_bias;
  void* probs;  // nullptr when not requested, likewise below
  void* map;
  bool bitmap;
  float* weights;
  void* indices;
  ffi::DataType index_dtype;
  float* act;
};

// A backward call: grad_logits [rows, experts] from the selected indices.
struct BwdProblem {
  int64_t rows;
  int64_t experts;
  RouteParams p;
  bool dense_grad;
  const void* grad;
  ffi::DataType grad_dtype;
  const void* indices;
  ffi::DataType index_dtype;
  const float* act;
  const void* logits;  // pre-softmax only
  ffi::DataType logits_dtype;
  void* grad_logits;
  ffi::DataType out_dtype;
};

inline bool IsFloatDtype(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}
inline bool IsIndexDtype(ffi::DataType t) {
  return t == ffi::DataType::S16 || t == ffi::DataType::S32 || t == ffi::DataType::S64;
}

inline ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("jax_router: " + what);
}

inline ffi::Error DecodeParams(const RouteAttrs& a, int64_t experts, RouteParams* out) {
  if (a.score_function < 0 || a.score_function > 2) return Invalid("unknown score_function");
  if (a.topk < 1 || a.topk > experts) return Invalid("topk must lie in [1, E]");
  bool groups = a.group_topk > 0;
  if (groups && (a.num_groups <= 0 || experts % a.num_groups != 0 ||
                 a.group_topk > a.num_groups || a.topk % a.group_topk != 0 ||
                 a.topk / a.group_topk > experts / a.num_groups)) {
    return Invalid("inconsistent num_groups / group_topk");
  }
  *out = RouteParams{a.topk,
                     static_cast<ScoreFn>(a.score_function),
                     a.use_pre_softmax,
                     groups ? a.num_groups : 0,
                     groups ? a.group_topk : 0,
                     a.scaling_factor};
  return ffi::Error::Success();
}

// Sets *out to the data pointer of an optional output, or nullptr when it is zero-size; an
// error when its element count is neither 0 nor `expected`.
inline ffi::Error OptionalOut(const ffi::AnyBuffer& b, int64_t expected, const char* name,
                              void** out) {
  int64_t n = static_cast<int64_t>(b.element_count());
  *out = nullptr;
  if (n == 0 && expected != 0) return ffi::Error::Success();
  if (n != expected) return Invalid(std::string(name) + " has the wrong number of elements");
  *out = b.untyped_data();
  return ffi::Error::Success();
}

#define JR_RETURN_IF_ERROR(expr)                 \
  do {                                           \
    ::xla::ffi::Error jr_err_ = (expr);          \
    if (jr_err_.failure()) return jr_err_;       \
  } while (0)

inline int64_t LastDim(const ffi::AnyBuffer& b) {
  auto d = b.dimensions();
  return d.size() == 0 ? 1 : d.back();
}

inline ffi::Error MakeFwdProblem(FwdProblem& f, const RouteAttrs& attrs,
                                               const ffi::AnyBuffer& logits,
                                               const ffi::AnyBuffer& bias,
                                               const ffi::AnyBuffer& probs,
                                               const ffi::AnyBuffer& map,
                                               const ffi::AnyBuffer& weights,
                                               const ffi::AnyBuffer& indices,
                                               const ffi::AnyBuffer& act) {
  f = FwdProblem{};
  if (!IsFloatDtype(logits.element_type())) return Invalid("logits must be f32/bf16/f16");
  if (logits.dimensions().size() < 1) return Invalid("logits must have rank >= 1");
  f.experts = LastDim(logits);
  if (f.experts < 1) return Invalid("logits must have at least one expert");
  f.rows = static_cast<int64_t>(logits.element_count()) / f.experts;
  JR_RETURN_IF_ERROR(DecodeParams(attrs, f.experts, &f.p));
  f.logits = logits.untyped_data();
  f.logits_dtype = logits.element_type();

  int64_t nbias = static_cast<int64_t>(bias.element_count());
  if (nbias > 0) {
    if (bias.element_type() != ffi::DataType::F32) return Invalid("expert_bias must be f32");
    if (LastDim(bias) != f.experts || nbias % f.experts != 0) {
      return Invalid("expert_bias must have E elements per row");
    }
    int64_t nb = nbias / f.experts;
    if (f.rows % nb != 0) return Invalid("expert_bias rows do not divide the token rows");
    f.bias = static_cast<const float*>(bias.untyped_data());
    f.rows_per_bias = f.rows / nb;
  }

  int64_t tk = f.rows * f.p.topk;
  JR_RETURN_IF_ERROR(OptionalOut(probs, f.rows * f.experts, "probs", &f.probs));
  if (f.probs && probs.element_type() != f.logits_dtype) return Invalid("probs dtype != logits");

  f.bitmap = attrs.bitmap;
  JR_RETURN_IF_ERROR(OptionalOut(
      map, f.rows * (f.bitmap ? bitmap_bytes(f.experts) : f.experts), "routing_map", &f.map));
  if (f.map && map.element_type() != (f.bitmap ? ffi::DataType::U8 : ffi::DataType::PRED)) {
    return Invalid("routing_map dtype must be bool (bytemap) or uint8 (bitmap_u8)");
  }

  void* ptr;
  JR_RETURN_IF_ERROR(OptionalOut(weights, tk, "weights", &ptr));
  if (ptr && weights.element_type() != ffi::DataType::F32) return Invalid("weights must be f32");
  f.weights = static_cast<float*>(ptr);

  JR_RETURN_IF_ERROR(OptionalOut(indices, tk, "indices", &f.indices));
  if (f.indices && !IsIndexDtype(indices.element_type())) {
    return Invalid("indices must be int16/32/64");
  }
  f.index_dtype = indices.element_type();

  JR_RETURN_IF_ERROR(OptionalOut(act, tk, "act", &ptr));
  if (ptr && act.element_type() != ffi::DataType::F32) return Invalid("act must be f32");
  f.act = static_cast<float*>(ptr);
  return ffi::Error::Success();
}

inline ffi::Error MakeBwdProblem(BwdProblem& b, const RouteAttrs& attrs,
                                               const ffi::AnyBuffer& grad,
                                               const ffi::AnyBuffer& indices,
                                               const ffi::AnyBuffer& act,
                                               const ffi::AnyBuffer& logits,
                                               const ffi::AnyBuffer& grad_logits) {
  b = BwdProblem{};
  if (!IsFloatDtype(grad_logits.element_type())) return Invalid("grad_logits dtype");
  b.experts = LastDim(grad_logits);
  if (b.experts < 1) return Invalid("grad_logits must have at least one expert");
  b.rows = static_cast<int64_t>(grad_logits.element_count()) / b.experts;
  JR_RETURN_IF_ERROR(DecodeParams(attrs, b.experts, &b.p));
  b.dense_grad = attrs.dense_grad;
  int64_t tk = b.rows * b.p.topk;

  if (!IsFloatDtype(grad.element_type())) return Invalid("grad dtype");
  if (static_cast<int64_t>(grad.element_count()) != (b.dense_grad ? b.rows * b.experts : tk)) {
    return Invalid("grad has the wrong number of elements");
  }
  if (!IsIndexDtype(indices.element_type()) ||
      static_cast<int64_t>(indices.element_count()) != tk) {
    return Invalid("indices must be int16/32/64 [T, topk]");
  }
  if (act.element_type() != ffi::DataType::F32 ||
      static_cast<int64_t>(act.element_count()) != tk) {
    return Invalid("act must be f32 [T, topk]");
  }
  bool need_logits = b.p.score_fn == ScoreFn::kSoftmax && b.p.pre_softmax;
  if (need_logits && (static_cast<int64_t>(logits.element_count()) != b.rows * b.experts ||
                      !IsFloatDtype(logits.element_type()))) {
    return Invalid("pre-softmax backward needs logits [T, E]");
  }
  b.grad = grad.untyped_data();
  b.grad_dtype = grad.element_type();
  b.indices = indices.untyped_data();
  b.index_dtype = indices.element_type();
  b.act = static_cast<const float*>(act.untyped_data());
  b.logits = need_logits ? logits.untyped_data() : nullptr;
  b.logits_dtype = logits.element_type();
  b.grad_logits = grad_logits.untyped_data();
  b.out_dtype = grad_logits.element_type();
  return ffi::Error::Success();
}

}  // namespace jax_router
