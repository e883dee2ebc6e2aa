// The FFI contract of the dispatch targets, shared by the CPU (dispatch_cpu.cc) and CUDA
// (dispatch_cuda.cu) handlers: buffers, attributes and their checks. jax_router/dispatch.py
// builds the calls (the Python side validates every argument first; these checks only keep a
// handler from reading or writing outside its buffers when called some other way).
//
// jax_router_dispatch_plan(topk_indices s16/s32/s64 [*lead, k])
//     attrs num_experts (E >= 1), capacity (C >= 0, or -1: none)
//   -> (tokens_per_expert s32[E], positions s32[*lead, k], source s32[R],
//       workspace s32[dispatch::plan_workspace_size(T * k, E)])
//   R = T * k without capacity, E * C with it. The workspace is scratch (dispatch_math.h).
// jax_router_permute(x [T, H], source s32[R], weights f32/bf16/f16 [T, k] | [0]) attrs topk
//   -> rows [R, H] in x's dtype: x[source[r] / k] (times weights[source[r]] when given), 0 for
//      a source outside [0, T * k).
// jax_router_unpermute(rows [R, H], positions s32[T, k], weights [T, k] | [0]) attrs topk
//   -> out [T, H] in rows' dtype: sum over j of weights[t, j] (1 when not given) *
//      rows[positions[t, j]], positions outside [0, R) skipped.
// jax_router_unpermute_bwd(dout [T, H], rows [R, H], positions s32[T, k]) attrs topk
//   -> dweights [T, k] (f32/bf16/f16): dot(dout[t], rows[positions[t, j]]), 0 where skipped.
#pragma once

#include <cstdint>
#include <string>

#include "dispatch_math.h"
#include "ffi_contract.h"
#include "xla/ffi/api/ffi.h"

namespace jax_router {

namespace ffi = xla::ffi;

struct PlanProblem {
  int64_t n;         // flat (token, slot) entries, T * k
  int64_t experts;   // E
  int64_t capacity;  // C, or dispatch::kNoCapacity
  int64_t rows;      // R
  int64_t tiles;     // dispatch::plan_tiles(n)
  const void* ids;
  ffi::DataType id_dtype;
  int32_t* tokens_per_expert;
  int32_t* positions;
  int32_t* source;
  int32_t* workspace;
};

// permute, unpermute and unpermute_bwd: T tokens of H elements, k slots each, R buffer rows.
struct RowsProblem {
  int64_t tokens, topk, hidden, rows;
  const void* x;            // permute: x [T, H]; unpermute: rows [R, H]; bwd: dout [T, H]
  const void* rows_in;      // bwd only: rows [R, H]
  ffi::DataType dtype;      // of x (and rows_in)
  const int32_t* index;     // permute: source [R]; unpermute / bwd: positions [T, k]
  const void* weights;      // [T, k] or nullptr (unweighted)
  ffi::DataType w_dtype;
  void* out;                // permute: [R, H]; unpermute: [T, H]; bwd: dweights [T, k]
  ffi::DataType out_dtype;
};

// Leading rows and last dim of a rank >= 1 float buffer.
inline ffi::Error FloatRowsAndLast(const ffi::AnyBuffer& b, const char* name, int64_t* rows,
                                   int64_t* last) {
  auto d = b.dimensions();
  if (!IsFloatDtype(b.element_type())) return Invalid(std::string(name) + " must be f32/bf16/f16");
  if (d.size() < 1) return Invalid(std::string(name) + " must have rank >= 1");
  *last = d.back();
  *rows = 1;
  for (size_t i = 0; i + 1 < d.size(); ++i) *rows *= d[i];
  return ffi::Error::Success();
}

inline ffi::Error CheckInt32(const ffi::AnyBuffer& b, int64_t expected, const char* name) {
  if (b.element_type() != ffi::DataType::S32 ||
      static_cast<int64_t>(b.element_count()) != expected) {
    return Invalid(std::string(name) + " must be int32 with " + std::to_string(expected) +
                   " elements");
  }
  return ffi::Error::Success();
}

inline ffi::Error MakePlanProblem(PlanProblem& p, int64_t num_experts, int64_t capacity,
                                  const ffi::AnyBuffer& ids, const ffi::AnyBuffer& tpe,
                                  const ffi::AnyBuffer& positions, const ffi::AnyBuffer& source,
                                  const ffi::AnyBuffer& workspace) {
  p = PlanProblem{};
  if (num_experts < 1 || num_experts > INT32_MAX) return Invalid("num_experts must be >= 1");
  if (capacity < dispatch::kNoCapacity) return Invalid("capacity must be >= 0 or -1 (none)");
  if (!IsIndexDtype(ids.element_type())) return Invalid("topk_indices must be int16/32/64");
  p.n = static_cast<int64_t>(ids.element_count());
  p.experts = num_experts;
  p.capacity = capacity;
  p.rows = capacity < 0 ? p.n : num_experts * capacity;
  if (p.n > INT32_MAX || p.rows > INT32_MAX) return Invalid("the plan's rows must be < 2^31");
  p.tiles = dispatch::plan_tiles(p.n);
  JR_RETURN_IF_ERROR(CheckInt32(tpe, num_experts, "tokens_per_expert"));
  JR_RETURN_IF_ERROR(CheckInt32(positions, p.n, "positions"));
  JR_RETURN_IF_ERROR(CheckInt32(source, p.rows, "source"));
  JR_RETURN_IF_ERROR(
      CheckInt32(workspace, dispatch::plan_workspace_size(p.n, num_experts), "plan workspace"));
  p.ids = ids.untyped_data();
  p.id_dtype = ids.element_type();
  p.tokens_per_expert = static_cast<int32_t*>(tpe.untyped_data());
  p.positions = static_cast<int32_t*>(positions.untyped_data());
  p.source = static_cast<int32_t*>(source.untyped_data());
  p.workspace = static_cast<int32_t*>(workspace.untyped_data());
  return ffi::Error::Success();
}

// Optional [T, k] weights: zero-size means unweighted.
inline ffi::Error OptionalWeights(RowsProblem& p, const ffi::AnyBuffer& weights) {
  p.weights = nullptr;
  p.w_dtype = ffi::DataType::F32;
  if (weights.element_count() == 0) return ffi::Error::Success();
  if (!IsFloatDtype(weights.element_type()) ||
      static_cast<int64_t>(weights.element_count()) != p.tokens * p.topk) {
    return Invalid("topk_weights must be f32/bf16/f16 [T, topk]");
  }
  p.weights = weights.untyped_data();
  p.w_dtype = weights.element_type();
  return ffi::Error::Success();
}

inline ffi::Error MakePermuteProblem(RowsProblem& p, int64_t topk, const ffi::AnyBuffer& x,
                                     const ffi::AnyBuffer& source,
                                     const ffi::AnyBuffer& weights, const ffi::AnyBuffer& out) {
  p = RowsProblem{};
  if (topk < 1) return Invalid("topk must be >= 1");
  JR_RETURN_IF_ERROR(FloatRowsAndLast(x, "x", &p.tokens, &p.hidden));
  p.topk = topk;
  p.rows = static_cast<int64_t>(source.element_count());
  JR_RETURN_IF_ERROR(CheckInt32(source, p.rows, "source"));
  JR_RETURN_IF_ERROR(OptionalWeights(p, weights));
  if (out.element_type() != x.element_type() ||
      static_cast<int64_t>(out.element_count()) != p.rows * p.hidden) {
    return Invalid("permute's rows must be [R, H] in x's dtype");
  }
  p.x = x.untyped_data();
  p.dtype = x.element_type();
  p.index = static_cast<const int32_t*>(source.untyped_data());
  p.out = out.untyped_data();
  p.out_dtype = out.element_type();
  return ffi::Error::Success();
}

// unpermute (out [T, H]) and its weights backward (out = dweights [T, k]) read [R, H] rows
// through positions [T, k]; `tokens_of` is the [T, H] buffer that gives T (out, or dout).
inline ffi::Error MakeUnpermuteCommon(RowsProblem& p, int64_t topk, const ffi::AnyBuffer& rows,
                                      const ffi::AnyBuffer& tokens_of,
                                      const ffi::AnyBuffer& positions) {
  if (topk < 1) return Invalid("topk must be >= 1");
  int64_t hidden_t = 0;
  JR_RETURN_IF_ERROR(FloatRowsAndLast(rows, "rows", &p.rows, &p.hidden));
  JR_RETURN_IF_ERROR(FloatRowsAndLast(tokens_of, "out", &p.tokens, &hidden_t));
  if (hidden_t != p.hidden || tokens_of.element_type() != rows.element_type()) {
    return Invalid("the token rows must be [T, H] in rows' dtype");
  }
  p.topk = topk;
  JR_RETURN_IF_ERROR(CheckInt32(positions, p.tokens * topk, "positions"));
  p.index = static_cast<const int32_t*>(positions.untyped_data());
  p.dtype = rows.element_type();
  return ffi::Error::Success();
}

inline ffi::Error MakeUnpermuteProblem(RowsProblem& p, int64_t topk, const ffi::AnyBuffer& rows,
                                       const ffi::AnyBuffer& positions,
                                       const ffi::AnyBuffer& weights, const ffi::AnyBuffer& out) {
  p = RowsProblem{};
  JR_RETURN_IF_ERROR(MakeUnpermuteCommon(p, topk, rows, out, positions));
  JR_RETURN_IF_ERROR(OptionalWeights(p, weights));
  p.x = rows.untyped_data();
  p.out = out.untyped_data();
  p.out_dtype = out.element_type();
  return ffi::Error::Success();
}

inline ffi::Error MakeUnpermuteBwdProblem(RowsProblem& p, int64_t topk,
                                          const ffi::AnyBuffer& dout, const ffi::AnyBuffer& rows,
                                          const ffi::AnyBuffer& positions,
                                          const ffi::AnyBuffer& dweights) {
  p = RowsProblem{};
  JR_RETURN_IF_ERROR(MakeUnpermuteCommon(p, topk, rows, dout, positions));
  if (!IsFloatDtype(dweights.element_type()) ||
      static_cast<int64_t>(dweights.element_count()) != p.tokens * topk) {
    return Invalid("dweights must be f32/bf16/f16 [T, topk]");
  }
  p.x = dout.untyped_data();
  p.rows_in = rows.untyped_data();
  p.out = dweights.untyped_data();
  p.out_dtype = dweights.element_type();
  return ffi::Error::Success();
}

}  // namespace jax_router
