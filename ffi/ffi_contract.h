// The FFI contract of every target, shared by the CPU and CUDA handlers: attributes, buffers,
// and their checks. Attributes are decoded into typed values here, once; an unknown enum value
// is an error, never read as another.
//
// jax_router_fwd(logits [T,E], bias f32 [nb,E] | [0], *aliased) ->
//     (probs [T,E] | [0], map bool[T,E] | u8[T,ceil(E/8)] | [0], weights f32[T,k] | [0],
//      indices s16/s32/s64[T,k] | [0], act f32[T,k] | [0])
//   output_mode kCompact: weights + indices; kMap: probs + map (+ indices for the backward);
//   kDense: probs + indices. act (the backward's residual) is written when it has T*k elements.
// jax_router_qb_fwd(logits, bias, bin_bounds f32[2], histogram s32[E,nb], *aliased) ->
//     (jax_router_fwd's five outputs, cutoff f32[T], histogram s32[E,nb] (aliased to the
//      operand, accumulated in place)); attribute num_bins >= 1, sigmoid, no groups.
// jax_router_bwd(grad [T,E] (kMap/kDense) | f32[T,k] (kCompact), indices [T,k], act f32[T,k],
//                logits [T,E] (pre-softmax only) | [0]) -> grad_logits [T,E]
// jax_router_aux_scores_fwd(logits [T,E]) -> (scores f32 [T,E], map bool[T,E] | u8[T,ceil(E/8)])
// jax_router_aux_scores_bwd(grad_scores f32 [T,E], logits [T,E]) -> grad_logits [T,E]
//
// `act` is the compact residual (routing_math.h residual()). `nb` bias rows appear under vmap;
// token row r uses bias row r / (T / nb).
#pragma once

#include <cstdint>
#include <string>

#include "routing_math.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_REGISTER_ENUM_ATTR_DECODING(::jax_router::ScoreFn);
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(::jax_router::OutputMode);
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(::jax_router::MapFormat);

// Mirrored by jax_router/options.py (RouteOptions.ffi_attrs); every field is always sent.
struct RouteAttrs {
  int64_t topk;
  ::jax_router::ScoreFn score_function;
  bool use_pre_softmax;
  int64_t num_groups;
  int64_t group_topk;
  float scaling_factor;
  ::jax_router::OutputMode output_mode;
  ::jax_router::MapFormat map_format;
  int64_t num_bins;  // quantile balancing (jax_router_qb_fwd only); 0 elsewhere
};

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    RouteAttrs, ::xla::ffi::StructMember<int64_t>("topk"),
    ::xla::ffi::StructMember<::jax_router::ScoreFn>("score_function"),
    ::xla::ffi::StructMember<bool>("use_pre_softmax"),
    ::xla::ffi::StructMember<int64_t>("num_groups"),
    ::xla::ffi::StructMember<int64_t>("group_topk"),
    ::xla::ffi::StructMember<float>("scaling_factor"),
    ::xla::ffi::StructMember<::jax_router::OutputMode>("output_mode"),
    ::xla::ffi::StructMember<::jax_router::MapFormat>("map_format"),
    ::xla::ffi::StructMember<int64_t>("num_bins"));

// Mirrored by jax_router/aux_loss.py.
struct AuxAttrs {
  int64_t topk;
  ::jax_router::ScoreFn score_function;
  ::jax_router::MapFormat map_format;
};

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    AuxAttrs, ::xla::ffi::StructMember<int64_t>("topk"),
    ::xla::ffi::StructMember<::jax_router::ScoreFn>("score_function"),
    ::xla::ffi::StructMember<::jax_router::MapFormat>("map_format"));

namespace jax_router {

namespace ffi = xla::ffi;

// ---- errors --------------------------------------------------------------------------------

inline ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("jax_router: " + what);
}

#define JR_RETURN_IF_ERROR(expr)           \
  do {                                     \
    ::xla::ffi::Error jr_err_ = (expr);    \
    if (jr_err_.failure()) return jr_err_; \
  } while (0)

// ---- problems ------------------------------------------------------------------------------

// A routing forward call with every buffer checked against [rows, experts] and topk.
struct FwdProblem {
  int64_t rows;
  int64_t experts;
  RouteParams p;
  OutputMode mode;
  MapFormat map_format;
  const void* logits;
  ffi::DataType logits_dtype;
  const float* bias;  // nullptr: no bias (or a function that takes none)
  int64_t rows_per_bias;
  void* probs;  // nullptr when not written, likewise below
  void* map;
  float* weights;
  void* indices;
  ffi::DataType index_dtype;
  float* act;
  // Quantile balancing (p.num_bins > 0): bin bounds [lower, upper] (device memory on CUDA),
  // the per-row cutoff and the int32 [E, num_bins] histogram, accumulated in place.
  const float* bin_bounds;
  float* cutoff;
  int32_t* histogram;
};

// A backward call: grad_logits [rows, experts] from the selected indices.
struct BwdProblem {
  int64_t rows;
  int64_t experts;
  RouteParams p;
  bool dense_grad;  // grad is [T, E] (probs' cotangent), else [T, k]
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

struct AuxFwd {
  int64_t rows, experts, topk;
  ScoreFn fn;
  MapFormat map_format;
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

// ---- checks --------------------------------------------------------------------------------

inline bool IsFloatDtype(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}
inline bool IsIndexDtype(ffi::DataType t) {
  return t == ffi::DataType::S16 || t == ffi::DataType::S32 || t == ffi::DataType::S64;
}

inline int64_t LastDim(const ffi::AnyBuffer& b) {
  auto d = b.dimensions();
  return d.size() == 0 ? 1 : d.back();
}

inline ffi::DataType MapDtype(MapFormat f) {
  return f == MapFormat::kBitmapU8 ? ffi::DataType::U8 : ffi::DataType::PRED;
}

inline ffi::Error CheckScoreFn(ScoreFn f) {
  if (!IsKnownScoreFn(static_cast<int64_t>(f))) return Invalid("unknown score_function");
  return ffi::Error::Success();
}

inline ffi::Error CheckMapFormat(MapFormat f) {
  if (!IsKnownMapFormat(static_cast<int64_t>(f))) return Invalid("unknown map_format");
  return ffi::Error::Success();
}

// Rows and experts of a [*lead, E] float buffer.
inline ffi::Error RowsOf(const ffi::AnyBuffer& b, const char* name, int64_t* rows,
                         int64_t* experts) {
  if (!IsFloatDtype(b.element_type())) return Invalid(std::string(name) + " must be f32/bf16/f16");
  if (b.dimensions().size() < 1) return Invalid(std::string(name) + " must have rank >= 1");
  *experts = LastDim(b);
  if (*experts < 1) return Invalid(std::string(name) + " must have at least one expert");
  *rows = static_cast<int64_t>(b.element_count()) / *experts;
  return ffi::Error::Success();
}

inline ffi::Error DecodeParams(const RouteAttrs& a, int64_t experts, RouteParams* out) {
  JR_RETURN_IF_ERROR(CheckScoreFn(a.score_function));
  JR_RETURN_IF_ERROR(CheckMapFormat(a.map_format));
  if (!IsKnownOutputMode(static_cast<int64_t>(a.output_mode))) return Invalid("unknown output_mode");
  if (a.topk < 1 || a.topk > experts) return Invalid("topk must lie in [1, E]");
  if (a.use_pre_softmax && IsElementwise(a.score_function)) {
    return Invalid("use_pre_softmax applies to softmax only");
  }
  const bool groups = a.group_topk > 0;
  if (groups && (a.num_groups <= 0 || experts % a.num_groups != 0 ||
                 a.group_topk > a.num_groups || a.topk % a.group_topk != 0 ||
                 a.topk / a.group_topk > experts / a.num_groups)) {
    return Invalid("inconsistent num_groups / group_topk");
  }
  if (a.num_bins < 0 || a.num_bins > kMaxQbBins) return Invalid("num_bins out of range");
  if (a.num_bins > 0 && (a.score_function != ScoreFn::kSigmoid || groups ||
                         a.topk + 1 > experts)) {
    return Invalid("quantile balancing needs sigmoid, no groups and topk + 1 <= E");
  }
  *out = RouteParams{a.topk,
                     a.score_function,
                     a.use_pre_softmax,
                     groups ? a.num_groups : 0,
                     groups ? a.group_topk : 0,
                     a.scaling_factor,
                     a.num_bins};
  return ffi::Error::Success();
}

// Sets *out to the data of an output that must hold `expected` elements of `dtype` when
// `required`, or may be zero-size (then nullptr) when not.
inline ffi::Error Output(const ffi::AnyBuffer& b, bool required, int64_t expected,
                         ffi::DataType dtype, const char* name, void** out) {
  const int64_t n = static_cast<int64_t>(b.element_count());
  *out = nullptr;
  if (n == 0 && (!required || expected == 0)) return ffi::Error::Success();
  if (n != expected) return Invalid(std::string(name) + " has the wrong number of elements");
  if (b.element_type() != dtype) return Invalid(std::string(name) + " has the wrong dtype");
  *out = b.untyped_data();
  return ffi::Error::Success();
}

inline ffi::Error MakeFwdProblem(FwdProblem& f, const RouteAttrs& attrs,
                                 const ffi::AnyBuffer& logits, const ffi::AnyBuffer& bias,
                                 const ffi::AnyBuffer& probs, const ffi::AnyBuffer& map,
                                 const ffi::AnyBuffer& weights, const ffi::AnyBuffer& indices,
                                 const ffi::AnyBuffer& act) {
  f = FwdProblem{};
  JR_RETURN_IF_ERROR(RowsOf(logits, "logits", &f.rows, &f.experts));
  JR_RETURN_IF_ERROR(DecodeParams(attrs, f.experts, &f.p));
  f.mode = attrs.output_mode;
  f.map_format = attrs.map_format;
  f.logits = logits.untyped_data();
  f.logits_dtype = logits.element_type();

  const int64_t nbias = static_cast<int64_t>(bias.element_count());
  if (nbias > 0 && UsesBias(f.p.score_fn)) {
    if (bias.element_type() != ffi::DataType::F32) return Invalid("expert_bias must be f32");
    if (LastDim(bias) != f.experts || nbias % f.experts != 0) {
      return Invalid("expert_bias must have E elements per row");
    }
    const int64_t nb = nbias / f.experts;
    if (f.rows % nb != 0) return Invalid("expert_bias rows do not divide the token rows");
    f.bias = static_cast<const float*>(bias.untyped_data());
    f.rows_per_bias = f.rows / nb;
  }

  const int64_t tk = f.rows * f.p.topk;
  const bool compact = f.mode == OutputMode::kCompact;
  void* ptr;
  JR_RETURN_IF_ERROR(
      Output(probs, !compact, f.rows * f.experts, f.logits_dtype, "probs", &f.probs));
  JR_RETURN_IF_ERROR(Output(map, f.mode == OutputMode::kMap,
                            f.rows * map_bytes_per_row(f.map_format, f.experts),
                            MapDtype(f.map_format), "routing_map", &f.map));
  JR_RETURN_IF_ERROR(Output(weights, compact, tk, ffi::DataType::F32, "weights", &ptr));
  f.weights = static_cast<float*>(ptr);
  f.index_dtype = indices.element_type();
  if (!IsIndexDtype(f.index_dtype) && indices.element_count() > 0) {
    return Invalid("indices must be int16/32/64");
  }
  JR_RETURN_IF_ERROR(Output(indices, f.mode != OutputMode::kMap, tk, f.index_dtype, "indices",
                            &f.indices));
  JR_RETURN_IF_ERROR(Output(act, false, tk, ffi::DataType::F32, "act", &ptr));
  f.act = static_cast<float*>(ptr);
  if (f.mode != OutputMode::kMap) f.map = nullptr;
  if (compact) f.probs = nullptr;
  return ffi::Error::Success();
}

// jax_router_fwd proper: quantile balancing has its own target.
inline ffi::Error CheckNotQb(const FwdProblem& f) {
  if (is_qb(f.p)) return Invalid("num_bins is an attribute of jax_router_qb_fwd only");
  return ffi::Error::Success();
}

// jax_router_qb_fwd: MakeFwdProblem's buffers plus bin_bounds f32[2], the given histogram
// `hist_in` (aliased to the returned one `hist_out`: the same memory, which the handler
// accumulates into) and cutoff f32[T]. When XLA gives two buffers, *copy_from is set to the
// given counts, which the handler copies into the output first; otherwise it is nullptr.
inline ffi::Error MakeQbFwdProblem(FwdProblem& f, const RouteAttrs& attrs,
                                   const ffi::AnyBuffer& logits, const ffi::AnyBuffer& bias,
                                   const ffi::AnyBuffer& bin_bounds, const ffi::AnyBuffer& hist_in,
                                   const ffi::AnyBuffer& probs, const ffi::AnyBuffer& map,
                                   const ffi::AnyBuffer& weights, const ffi::AnyBuffer& indices,
                                   const ffi::AnyBuffer& act, const ffi::AnyBuffer& cutoff,
                                   const ffi::AnyBuffer& hist_out, const int32_t** copy_from) {
  if (attrs.num_bins < 1) return Invalid("jax_router_qb_fwd needs num_bins >= 1");
  JR_RETURN_IF_ERROR(MakeFwdProblem(f, attrs, logits, bias, probs, map, weights, indices, act));
  if (bin_bounds.element_type() != ffi::DataType::F32 || bin_bounds.element_count() != 2) {
    return Invalid("bin_bounds must be f32[2]");
  }
  f.bin_bounds = static_cast<const float*>(bin_bounds.untyped_data());
  void* ptr;
  JR_RETURN_IF_ERROR(Output(cutoff, true, f.rows, ffi::DataType::F32, "cutoff", &ptr));
  f.cutoff = static_cast<float*>(ptr);
  JR_RETURN_IF_ERROR(Output(hist_out, true, f.experts * f.p.num_bins, ffi::DataType::S32,
                            "histogram", &ptr));
  f.histogram = static_cast<int32_t*>(ptr);
  *copy_from = nullptr;
  if (hist_in.untyped_data() != f.histogram) {
    if (hist_in.element_type() != ffi::DataType::S32 ||
        hist_in.element_count() != hist_out.element_count()) {
      return Invalid("the given histogram must be s32 with E * num_bins elements");
    }
    *copy_from = static_cast<const int32_t*>(hist_in.untyped_data());
  }
  return ffi::Error::Success();
}

inline ffi::Error MakeBwdProblem(BwdProblem& b, const RouteAttrs& attrs,
                                 const ffi::AnyBuffer& grad, const ffi::AnyBuffer& indices,
                                 const ffi::AnyBuffer& act, const ffi::AnyBuffer& logits,
                                 const ffi::AnyBuffer& grad_logits) {
  b = BwdProblem{};
  JR_RETURN_IF_ERROR(RowsOf(grad_logits, "grad_logits", &b.rows, &b.experts));
  JR_RETURN_IF_ERROR(DecodeParams(attrs, b.experts, &b.p));
  b.dense_grad = attrs.output_mode != OutputMode::kCompact;
  const int64_t tk = b.rows * b.p.topk;

  if (!IsFloatDtype(grad.element_type())) return Invalid("grad must be f32/bf16/f16");
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
  const bool need_logits = b.p.score_fn == ScoreFn::kSoftmax && b.p.pre_softmax;
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

inline ffi::Error MakeAuxFwd(AuxFwd& f, const AuxAttrs& attrs, const ffi::AnyBuffer& logits,
                             const ffi::AnyBuffer& scores, const ffi::AnyBuffer& map) {
  f = AuxFwd{};
  JR_RETURN_IF_ERROR(RowsOf(logits, "logits", &f.rows, &f.experts));
  if (attrs.topk < 1 || attrs.topk > f.experts) return Invalid("topk must lie in [1, E]");
  JR_RETURN_IF_ERROR(CheckScoreFn(attrs.score_function));
  JR_RETURN_IF_ERROR(CheckMapFormat(attrs.map_format));
  f.topk = attrs.topk;
  f.fn = attrs.score_function;
  f.map_format = attrs.map_format;
  void* ptr;
  JR_RETURN_IF_ERROR(
      Output(scores, true, f.rows * f.experts, ffi::DataType::F32, "aux scores", &ptr));
  f.scores = static_cast<float*>(ptr);
  JR_RETURN_IF_ERROR(Output(map, true, f.rows * map_bytes_per_row(f.map_format, f.experts),
                            MapDtype(f.map_format), "aux routing_map", &ptr));
  f.map = static_cast<uint8_t*>(ptr);
  f.logits = logits.untyped_data();
  f.logits_dtype = logits.element_type();
  return ffi::Error::Success();
}

inline ffi::Error MakeAuxBwd(AuxBwd& b, ScoreFn score_function, const ffi::AnyBuffer& grad,
                             const ffi::AnyBuffer& logits, const ffi::AnyBuffer& grad_logits) {
  b = AuxBwd{};
  JR_RETURN_IF_ERROR(RowsOf(logits, "logits", &b.rows, &b.experts));
  if (grad_logits.element_type() != logits.element_type()) {
    return Invalid("grad_logits dtype must equal the logits dtype");
  }
  JR_RETURN_IF_ERROR(CheckScoreFn(score_function));
  b.fn = score_function;
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
