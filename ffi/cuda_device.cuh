// Device properties the launchers size their grids from, queried once per device and cached:
// a handler may run under stream capture, where it must not query the stream, and the
// attribute calls cost a driver round trip each.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace jax_router {
namespace cuda {

constexpr int kMaxDevices = 64;

inline int CurrentDevice() {
  int d = 0;
  if (cudaGetDevice(&d) != cudaSuccess || d < 0 || d >= kMaxDevices) d = 0;
  return d;
}

inline int CachedAttr(cudaDeviceAttr attr, std::atomic<int>* cache, int dev, int fallback) {
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v > 0) return v;
  if (cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess || v <= 0) {
    cudaGetLastError();
    return fallback;
  }
  cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

inline int SmCount(int dev) {
  static std::atomic<int> cache[kMaxDevices];
  return CachedAttr(cudaDevAttrMultiProcessorCount, cache, dev, 132);
}

inline int CcMajor(int dev) {
  static std::atomic<int> cache[kMaxDevices];
  return CachedAttr(cudaDevAttrComputeCapabilityMajor, cache, dev, 0);
}

inline int SmemOptin(int dev) {
  static std::atomic<int> cache[kMaxDevices];
  return CachedAttr(cudaDevAttrMaxSharedMemoryPerBlockOptin, cache, dev, 48 * 1024);
}

// Lets `kernel` take more than the default 48 KiB of dynamic shared memory on device dev: the
// limit is raised once per device and kernel, to all the device allows (its opt-in size less
// the kernel's static shared memory), so that concurrent callers never lower it. `raised` is
// the caller's per-kernel cache, a static array of kMaxDevices flags.
template <typename Kern>
inline cudaError_t AllowDynamicSmem(Kern kernel, size_t smem, int dev, std::atomic<int>* raised) {
  if (smem <= 48 * 1024 || raised[dev].load(std::memory_order_relaxed) != 0) return cudaSuccess;
  cudaFuncAttributes fa{};
  cudaError_t e = cudaFuncGetAttributes(&fa, kernel);
  if (e != cudaSuccess) return e;
  const int most = SmemOptin(dev) - static_cast<int>(fa.sharedSizeBytes);
  if (static_cast<int64_t>(smem) > most) return cudaErrorInvalidValue;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most);
  if (e == cudaSuccess) raised[dev].store(1, std::memory_order_relaxed);
  return e;
}

}  // namespace cuda
}  // namespace jax_router
