// Thread block clusters (sm_90 and later): the blocks of a cluster run at once on one GPC, can
// wait for each other at a hardware barrier and read each other's shared memory. Written as the
// PTX instructions themselves (no cooperative_groups), so that no header brings a second
// `cuda` namespace into the handlers. Before sm_90 the functions compile to nothing; the
// launchers never give such a device a cluster (ClusterCapable).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_device.cuh"

namespace jax_router {
namespace cuda {

// This block's rank in its cluster, 0 .. cluster size - 1.
__device__ __forceinline__ unsigned cluster_block_rank() {
  unsigned r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
  return r;
}

// A barrier of every thread of every block of the cluster; shared-memory writes before it are
// visible to every block's reads after it (release / acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n\t"
      "barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// cluster_sync's two halves without its memory ordering, for a block that has read the other
// blocks' shared memory and only has to stay resident until they are done reading its own:
// arrive does not wait for this thread's earlier stores (a release would), and takes `used`, a
// value computed from every remote load the thread made, so that those loads have returned
// before it arrives.
__device__ __forceinline__ void cluster_arrive_relaxed(int32_t used) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned; // %0" ::"r"(used) : "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

// *p in the shared memory of the cluster's block `rank` (p an address of this block's shared
// memory: every block of a kernel has the same layout).
__device__ __forceinline__ int32_t load_cluster_shared(const int32_t* p, unsigned rank) {
  int32_t v = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("ld.shared::cluster.s32 %0, [%1];" : "=r"(v) : "r"(remote) : "memory");
#endif
  return v;
}

// Whether device dev runs clusters (compute capability 9.0 or later).
inline bool ClusterCapable(int dev) {
  static std::atomic<int> cache[kMaxDevices];
  return CachedAttr(cudaDevAttrComputeCapabilityMajor, cache, dev, 0) >= 9;
}

}  // namespace cuda
}  // namespace jax_router
