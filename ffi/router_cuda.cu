// CUDA handlers for jax_router_fwd / jax_router_qb_fwd / jax_router_bwd (contract: ffi_contract.h). The kernels
// live in router_fwd_fast.cuh, router_fwd_small.cuh, router_fwd_grouped.cuh,
// router_fwd_general.cuh and router_bwd.cuh, their planning and
// launching in router_launch.cuh.
//
// Handlers run on the stream XLA passes, allocate nothing, never synchronise, and query device
// properties once per device (cached), so they are safe inside XLA command buffers.
#include <cuda_runtime.h>

#include <string>

#include "cuda_handlers.h"
#include "ffi_contract.h"
#include "router_launch.cuh"

namespace ffi = xla::ffi;
using namespace jax_router;

static ffi::Error Forward(cudaStream_t stream, const FwdProblem& f) {
  if (f.rows == 0) return ffi::Error::Success();
  cuda::FwdArgs a;
  a.rows = f.rows;
  a.experts = f.experts;
  a.p = f.p;
  a.logits = f.logits;
  a.logits_dt = ToDt(f.logits_dtype);
  a.bias = f.bias;
  a.rows_per_bias = f.rows_per_bias;
  a.probs = f.probs;
  a.map = f.map;
  a.bitmap = f.map_format == MapFormat::kBitmapU8;
  a.weights = f.weights;
  a.indices = f.indices;
  a.index_dt = ToIt(f.index_dtype);
  a.act = f.act;
  a.bin_bounds = f.bin_bounds;
  a.cutoff = f.cutoff;
  a.histogram = f.histogram;
  if (cuda::PlanForward(f.experts, f.p).path == cuda::FwdPath::kGeneral &&
      f.experts > cuda::MaxGeneralExperts(cuda::CurrentDevice())) {
    return ffi::Error::InvalidArgument(
        "jax_router: E=" + std::to_string(f.experts) +
        " needs more shared memory per block than this GPU has for the general CUDA path");
  }
  cudaError_t e = cuda::LaunchForward(a, stream);
  if (e != cudaSuccess) return CudaError("forward launch failed", e);
  return ffi::Error::Success();
}

static ffi::Error FwdCuda(cudaStream_t stream, RouteAttrs attrs, ffi::AnyBuffer logits,
                          ffi::AnyBuffer bias, ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> probs,
                          ffi::Result<ffi::AnyBuffer> map, ffi::Result<ffi::AnyBuffer> weights,
                          ffi::Result<ffi::AnyBuffer> indices, ffi::Result<ffi::AnyBuffer> act) {
  FwdProblem f;
  JR_RETURN_IF_ERROR(MakeFwdProblem(f, attrs, logits, bias, *probs, *map, *weights, *indices, *act));
  JR_RETURN_IF_ERROR(CheckNotQb(f));
  return Forward(stream, f);
}

static ffi::Error QbFwdCuda(cudaStream_t stream, RouteAttrs attrs, ffi::AnyBuffer logits,
                            ffi::AnyBuffer bias, ffi::AnyBuffer bin_bounds, ffi::AnyBuffer hist_in,
                            ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> probs,
                            ffi::Result<ffi::AnyBuffer> map, ffi::Result<ffi::AnyBuffer> weights,
                            ffi::Result<ffi::AnyBuffer> indices, ffi::Result<ffi::AnyBuffer> act,
                            ffi::Result<ffi::AnyBuffer> cutoff,
                            ffi::Result<ffi::AnyBuffer> hist_out) {
  FwdProblem f;
  const int32_t* copy_from;
  JR_RETURN_IF_ERROR(MakeQbFwdProblem(f, attrs, logits, bias, bin_bounds, hist_in, *probs, *map,
                                      *weights, *indices, *act, *cutoff, *hist_out, &copy_from));
  if (copy_from) {  // not aliased: start from the given counts
    cudaError_t e = cudaMemcpyAsync(f.histogram, copy_from,
                                    hist_out->element_count() * sizeof(int32_t),
                                    cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return CudaError("histogram copy failed", e);
  }
  return Forward(stream, f);
}

static ffi::Error BwdCuda(cudaStream_t stream, RouteAttrs attrs, ffi::AnyBuffer grad,
                          ffi::AnyBuffer indices, ffi::AnyBuffer act, ffi::AnyBuffer logits,
                          ffi::Result<ffi::AnyBuffer> grad_logits) {
  BwdProblem b;
  JR_RETURN_IF_ERROR(MakeBwdProblem(b, attrs, grad, indices, act, logits, *grad_logits));
  if (b.rows == 0) return ffi::Error::Success();
  cuda::BwdArgs a;
  a.rows = b.rows;
  a.experts = b.experts;
  a.p = b.p;
  a.dense_grad = b.dense_grad;
  a.grad = b.grad;
  a.grad_dt = ToDt(b.grad_dtype);
  a.indices = b.indices;
  a.index_dt = ToIt(b.index_dtype);
  a.act = b.act;
  a.logits = b.logits;
  a.logits_dt = ToDt(b.logits_dtype);
  a.grad_logits = b.grad_logits;
  a.out_dt = ToDt(b.out_dtype);
  cudaError_t e = cuda::LaunchBackward(a, stream);
  if (e != cudaSuccess) return CudaError("backward launch failed", e);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterFwdCuda, FwdCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attrs<RouteAttrs>()
                                  .Arg<ffi::AnyBuffer>()  // logits
                                  .Arg<ffi::AnyBuffer>()  // expert_bias
                                  .RemainingArgs()        // caller's indices buffer (aliased)
                                  .Ret<ffi::AnyBuffer>()  // probs
                                  .Ret<ffi::AnyBuffer>()  // routing map
                                  .Ret<ffi::AnyBuffer>()  // weights
                                  .Ret<ffi::AnyBuffer>()  // indices
                                  .Ret<ffi::AnyBuffer>(),  // act (residual)
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterQbFwdCuda, QbFwdCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attrs<RouteAttrs>()
                                  .Arg<ffi::AnyBuffer>()  // logits
                                  .Arg<ffi::AnyBuffer>()  // expert_bias
                                  .Arg<ffi::AnyBuffer>()  // bin_bounds
                                  .Arg<ffi::AnyBuffer>()  // histogram (aliased)
                                  .RemainingArgs()        // caller's indices buffer (aliased)
                                  .Ret<ffi::AnyBuffer>()  // probs
                                  .Ret<ffi::AnyBuffer>()  // routing map
                                  .Ret<ffi::AnyBuffer>()  // weights
                                  .Ret<ffi::AnyBuffer>()  // indices
                                  .Ret<ffi::AnyBuffer>()  // act (residual)
                                  .Ret<ffi::AnyBuffer>()  // cutoff
                                  .Ret<ffi::AnyBuffer>(),  // histogram
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterBwdCuda, BwdCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attrs<RouteAttrs>()
                                  .Arg<ffi::AnyBuffer>()  // grad (probs or weights cotangent)
                                  .Arg<ffi::AnyBuffer>()  // indices
                                  .Arg<ffi::AnyBuffer>()  // act
                                  .Arg<ffi::AnyBuffer>()  // logits (pre-softmax) or empty
                                  .Ret<ffi::AnyBuffer>(),  // grad_logits
                              {ffi::Traits::kCmdBufferCompatible});
