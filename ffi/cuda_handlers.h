// What the CUDA FFI handlers (router_cuda.cu, aux_scores_cuda.cu) share: XLA dtypes to the
// kernels' element types, and CUDA errors as FFI errors.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "cuda_common.cuh"
#include "ffi_contract.h"

namespace jax_router {

// Only float dtypes reach here (ffi_contract.h checks them first).
inline cuda::Dt ToDt(ffi::DataType t) {
  return t == ffi::DataType::BF16 ? cuda::Dt::kBF16
                                  : (t == ffi::DataType::F16 ? cuda::Dt::kF16 : cuda::Dt::kF32);
}

// Only index dtypes reach here (ffi_contract.h checks them first).
inline cuda::It ToIt(ffi::DataType t) {
  return t == ffi::DataType::S16 ? cuda::It::kS16
                                 : (t == ffi::DataType::S64 ? cuda::It::kS64 : cuda::It::kS32);
}

inline ffi::Error CudaError(const char* what, cudaError_t e) {
  return ffi::Error::Internal(std::string("jax_router: ") + what + ": " + cudaGetErrorName(e) +
                              " (" + cudaGetErrorString(e) + ")");
}

}  // namespace jax_router
