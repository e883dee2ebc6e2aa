// CUDA handlers for jax_router_fwd / jax_router_bwd (contract: ffi_common.h).
// Placeholder until the kernels land: the handlers decode and check their buffers, then fail.
#include <cuda_runtime.h>

#include "ffi_common.h"

namespace ffi = xla::ffi;
using namespace jax_router;

static ffi::Error FwdCuda(cudaStream_t, RouteAttrs attrs, ffi::AnyBuffer logits,
                          ffi::AnyBuffer bias, ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> probs,
                          ffi::Result<ffi::AnyBuffer> map, ffi::Result<ffi::AnyBuffer> weights,
                          ffi::Result<ffi::AnyBuffer> indices, ffi::Result<ffi::AnyBuffer> act) {
  FwdProblem f;
  JR_RETURN_IF_ERROR(MakeFwdProblem(f, attrs, logits, bias, *probs, *map, *weights, *indices, *act));
  return ffi::Error::Internal("jax_router: CUDA forward not implemented yet");
}

static ffi::Error BwdCuda(cudaStream_t, RouteAttrs attrs, ffi::AnyBuffer grad,
                          ffi::AnyBuffer indices, ffi::AnyBuffer act, ffi::AnyBuffer logits,
                          ffi::Result<ffi::AnyBuffer> grad_logits) {
  BwdProblem b;
  JR_RETURN_IF_ERROR(MakeBwdProblem(b, attrs, grad, indices, act, logits, *grad_logits));
  return ffi::Error::Internal("jax_router: CUDA backward not implemented yet");
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
