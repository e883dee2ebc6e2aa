// The screen's error bound checked on the device it runs on (sigmoid_screen.cuh): every float32
// input, |screen_sigmoid(x) - sigmoid(x)| against routing_math.h's exact sigmoid. The _cuda
// module exposes it as screen_sigmoid_error(); tests/test_cross_platform.py asserts the bound.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_device.cuh"
#include "routing_math.h"
#include "screen_check.h"
#include "sigmoid_screen.cuh"

namespace jax_router {
namespace cuda {
namespace {

// out[0]: the largest error's bits (errors are >= 0, so the bits order as the values);
// out[1]: inputs where exactly one of the two results is NaN.
__global__ void screen_error_kernel(unsigned int* out) {
  uint32_t worst = 0, nan_mismatch = 0;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < (uint64_t{1} << 32); i += stride) {
    const float x = __uint_as_float(static_cast<uint32_t>(i));
    const float a = screen_sigmoid(x), s = sigmoid(x);
    if ((a != a) != (s != s)) ++nan_mismatch;
    if (a == a && s == s) worst = max(worst, __float_as_uint(fabsf(a - s)));
  }
  atomicMax(out, worst);
  if (nan_mismatch) atomicAdd(out + 1, nan_mismatch);
}

}  // namespace

ScreenError ScreenSigmoidError() {
  ScreenError r{-1.0f, kScreenSigmoidError, 0};
  unsigned int* d = nullptr;
  if (cudaMalloc(&d, 2 * sizeof(unsigned int)) != cudaSuccess) return r;
  unsigned int h[2] = {0, 0};
  cudaMemset(d, 0, sizeof(h));
  screen_error_kernel<<<SmCount(CurrentDevice()) * 8, 256>>>(d);
  const bool ok = cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost) == cudaSuccess;
  cudaFree(d);
  if (!ok) return r;
  float worst;
  static_assert(sizeof(worst) == sizeof(h[0]), "float bits");
  __builtin_memcpy(&worst, &h[0], sizeof(worst));
  r.max_error = worst;
  r.nan_mismatches = h[1];
  return r;
}

}  // namespace cuda
}  // namespace jax_router
