// What the CUDA micro-benchmarks (cuda_bench.cu, cuda_bench_dispatch.cu) share: an error check
// that stops the run, and a CUDA-event timer over back-to-back calls.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

// The integers of a comma-separated list ("1024,4096"), for the benchmarks' size variables.
inline std::vector<int> IntList(const char* s) {
  std::vector<int> v;
  for (const char* q = s; *q != '\0';) {
    v.push_back(std::atoi(q));
    while (*q != '\0' && *q != ',') ++q;
    if (*q == ',') ++q;
  }
  return v;
}

// Median over 7 repetitions of `iters` back-to-back calls f(i % sets) on `stream`, in us per
// call, after 2 * sets warm-up calls.
inline float TimeEvents(const std::function<void(int)>& f, int sets, int iters,
                        cudaStream_t stream = 0) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 2 * sets; ++i) f(i % sets);
  std::vector<float> ts;
  for (int rep = 0; rep < 7; ++rep) {
    CK(cudaEventRecord(a, stream));
    for (int i = 0; i < iters; ++i) f(i % sets);
    CK(cudaEventRecord(b, stream));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms * 1000.0f / iters);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

// Through a CUDA graph holding `per_graph` calls f(i % sets) captured on `stream` (as XLA's
// command buffers replay them): us per call, the launch gaps inside the graph included.
inline float TimeGraph(const std::function<void(int)>& f, int sets, int per_graph,
                       cudaStream_t stream) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < per_graph; ++i) f(i % sets);
  CK(cudaStreamEndCapture(stream, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  const float us = TimeEvents([&](int) { CK(cudaGraphLaunch(ge, stream)); }, 1, 20, stream);
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  return us / per_graph;
}
