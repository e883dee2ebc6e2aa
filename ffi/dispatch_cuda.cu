// CUDA handlers of the dispatch targets (contract: dispatch_contract.h). The kernels live in
// dispatch_plan.cuh (the plan) and dispatch_rows.cuh (permute, unpermute, the weights
// backward); their arithmetic is dispatch_math.h's, shared with the CPU handlers.
//
// Handlers run on the stream XLA passes, allocate nothing (the plan's scratch is its workspace
// output) and never synchronise, so they are safe inside XLA command buffers.
#include <cuda_runtime.h>

#include "cuda_handlers.h"
#include "dispatch_contract.h"
#include "dispatch_plan.cuh"
#include "dispatch_rows.cuh"

namespace ffi = xla::ffi;
using namespace jax_router;

static ffi::Error PlanCuda(cudaStream_t stream, int64_t num_experts, int64_t capacity,
                           ffi::AnyBuffer ids, ffi::Result<ffi::AnyBuffer> tpe,
                           ffi::Result<ffi::AnyBuffer> positions,
                           ffi::Result<ffi::AnyBuffer> source,
                           ffi::Result<ffi::AnyBuffer> workspace) {
  PlanProblem p;
  JR_RETURN_IF_ERROR(
      MakePlanProblem(p, num_experts, capacity, ids, *tpe, *positions, *source, *workspace));
  cuda::PlanArgs a;
  a.ids = p.ids;
  a.n = p.n;
  a.experts = static_cast<int32_t>(p.experts);
  a.capacity = p.capacity;
  a.rows = p.rows;
  a.tokens_per_expert = p.tokens_per_expert;
  a.positions = p.positions;
  a.source = p.source;
  cudaError_t e = cuda::LaunchPlan(a, ToIt(p.id_dtype), p.workspace, stream);
  if (e != cudaSuccess) return CudaError("dispatch_plan launch failed", e);
  return ffi::Error::Success();
}

static cuda::RowsArgs ToArgs(const RowsProblem& p) {
  cuda::RowsArgs a;
  a.tokens = p.tokens;
  a.topk = p.topk;
  a.hidden = p.hidden;
  a.rows = p.rows;
  a.x = p.x;
  a.rows_in = p.rows_in;
  a.index = p.index;
  a.weights = p.weights;
  a.w_dt = ToDt(p.w_dtype);
  a.out = p.out;
  a.out_dt = ToDt(p.out_dtype);
  return a;
}

static ffi::Error PermuteCuda(cudaStream_t stream, int64_t topk, ffi::AnyBuffer x,
                              ffi::AnyBuffer source, ffi::AnyBuffer weights,
                              ffi::Result<ffi::AnyBuffer> rows) {
  RowsProblem p;
  JR_RETURN_IF_ERROR(MakePermuteProblem(p, topk, x, source, weights, *rows));
  cudaError_t e = cuda::LaunchPermute(ToArgs(p), ToDt(p.dtype), stream);
  if (e != cudaSuccess) return CudaError("permute launch failed", e);
  return ffi::Error::Success();
}

static ffi::Error UnpermuteCuda(cudaStream_t stream, int64_t topk, ffi::AnyBuffer rows,
                                ffi::AnyBuffer positions, ffi::AnyBuffer weights,
                                ffi::Result<ffi::AnyBuffer> out) {
  RowsProblem p;
  JR_RETURN_IF_ERROR(MakeUnpermuteProblem(p, topk, rows, positions, weights, *out));
  cudaError_t e = cuda::LaunchUnpermute(ToArgs(p), ToDt(p.dtype), stream);
  if (e != cudaSuccess) return CudaError("unpermute launch failed", e);
  return ffi::Error::Success();
}

static ffi::Error UnpermuteBwdCuda(cudaStream_t stream, int64_t topk, ffi::AnyBuffer dout,
                                   ffi::AnyBuffer rows, ffi::AnyBuffer positions,
                                   ffi::Result<ffi::AnyBuffer> dweights) {
  RowsProblem p;
  JR_RETURN_IF_ERROR(MakeUnpermuteBwdProblem(p, topk, dout, rows, positions, *dweights));
  cudaError_t e = cuda::LaunchUnpermuteBwd(ToArgs(p), ToDt(p.dtype), stream);
  if (e != cudaSuccess) return CudaError("unpermute backward launch failed", e);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterDispatchPlanCuda, PlanCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("capacity")
                                  .Arg<ffi::AnyBuffer>()  // topk_indices
                                  .Ret<ffi::AnyBuffer>()  // tokens_per_expert
                                  .Ret<ffi::AnyBuffer>()  // positions
                                  .Ret<ffi::AnyBuffer>()  // source
                                  .Ret<ffi::AnyBuffer>(),  // workspace
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterPermuteCuda, PermuteCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<int64_t>("topk")
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // source
                                  .Arg<ffi::AnyBuffer>()  // weights or [0]
                                  .Ret<ffi::AnyBuffer>(),  // rows
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterUnpermuteCuda, UnpermuteCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<int64_t>("topk")
                                  .Arg<ffi::AnyBuffer>()  // rows
                                  .Arg<ffi::AnyBuffer>()  // positions
                                  .Arg<ffi::AnyBuffer>()  // weights or [0]
                                  .Ret<ffi::AnyBuffer>(),  // out
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterUnpermuteBwdCuda, UnpermuteBwdCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<int64_t>("topk")
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::AnyBuffer>()  // rows
                                  .Arg<ffi::AnyBuffer>()  // positions
                                  .Ret<ffi::AnyBuffer>(),  // dweights
                              {ffi::Traits::kCmdBufferCompatible});
