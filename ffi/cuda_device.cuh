// Device properties the launchers size their grids from, queried once per device and cached:
// a handler may run under stream capture, where it must not query the stream, and the
// attribute calls cost a driver round trip each.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

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

inline int SmemOptin(int dev) {
  static std::atomic<int> cache[kMaxDevices];
  return CachedAttr(cudaDevAttrMaxSharedMemoryPerBlockOptin, cache, dev, 48 * 1024);
}

}  // namespace cuda
}  // namespace jax_router
