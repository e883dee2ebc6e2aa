// Programmatic dependent launch (Hopper and later): a kernel launched with LaunchAfter may be
// scheduled while the kernel before it on the stream still runs, so its blocks do their
// independent prologue (loading their inputs, zeroing shared memory) in the other kernel's
// shadow instead of after a full drain and launch. Such a kernel must call
// wait_for_previous_grid() before it reads anything the previous kernel writes; the previous
// kernel calls allow_next_grid() once its blocks are running, which lets the next grid's blocks
// be scheduled early. Without the launch attribute (or before sm_90) both calls do nothing and
// the launch is an ordinary one, so correctness never depends on the overlap.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#ifndef JR_PDL  // a knob for the benchmarks' A/B runs only: 0 launches without the attribute
#define JR_PDL 1
#endif

namespace jax_router {
namespace cuda {

// Blocks until every block of the previous grid on the stream has finished and its memory
// operations are visible.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next grid (launched with LaunchAfter) be scheduled before this one ends.
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The start of a kernel launched with LaunchAfter that reads what the kernel before it wrote
// from its first instruction: it waits for that kernel, then lets the next one be scheduled
// (whose blocks wait in turn). Every block of this grid has started by then, so the next grid's
// waiting blocks never hold a place this grid needs; what the overlap saves is the next
// launch's latency, behind this kernel's run.
__device__ __forceinline__ void overlapped_start() {
  wait_for_previous_grid();
  allow_next_grid();
}

// kernel<<<grid, block, smem, s>>>(args...) with programmatic stream serialization allowed.
template <typename... Params, typename... Args>
cudaError_t LaunchAfter(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                        cudaStream_t s, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = JR_PDL;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace jax_router
