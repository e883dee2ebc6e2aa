// Host check of the bf16 sigmoid forward's shared-memory layout (router_fwd_sigmoid_bf16.cuh),
// built and run by tests/test_sigmoid_bf16_forward.py with nvcc (no GPU needed): for every E
// the kernel takes, one and two lanes a token, and a block's shared memory of the H200 / H100
// (227 KiB), A100 (163 KiB) and ~100 KiB devices, each warp's tile is 128-byte aligned, inside
// the block's bytes, and clear of the table's two halves, the bias and the other tiles; a block
// never asks for more than the device has. Prints "bad N" and exits with N.
#include <cstdio>

#include "cuda_device.cuh"
#include "router_fwd_sigmoid_bf16.cuh"

using namespace jax_router::cuda;

int main() {
  int bad = 0;
  for (int kib : {100, 163, 227}) {
    const int smem = kib * 1024 - 1024;  // as the launcher: 1 KiB for static shared memory
    for (int E = 64; E <= kSigmoidBf16MaxE; E += 64) {
      for (int lanes = 1; lanes <= 2; ++lanes) {
        if (lanes == 2 && E % 128 != 0) continue;
        const int w = SigmoidBf16Warps(E, lanes, smem, kSigmoidBf16MaxWarps);
        if (w < 2) {  // the launcher then takes the fast forward
          if (kib >= 163) std::printf("E %d lanes %d, %d KiB: %d warps\n", E, lanes, kib, w), ++bad;
          continue;
        }
        const int total = SigmoidBf16Smem(E, lanes, w), wb = SigmoidBf16WarpBytes(E, lanes);
        if (total > smem || total < kSigNegOff + kSigTableBytes) {
          std::printf("E %d lanes %d, %d KiB: a block of %d bytes\n", E, lanes, kib, total), ++bad;
        }
        for (int i = 0; i < w; ++i) {
          const int lo = SigmoidBf16TileOff(E, lanes, i), hi = lo + wb;
          auto overlaps = [&](int a, int b) { return lo < b && a < hi; };
          bool clash = lo % 128 != 0 || hi > total || overlaps(0, kSigTableBytes) ||
                       overlaps(kSigmoidBf16BiasOff, kSigmoidBf16BiasOff + 4 * E) ||
                       overlaps(kSigNegOff, kSigNegOff + kSigTableBytes);
          for (int j = 0; j < i; ++j) {
            const int lj = SigmoidBf16TileOff(E, lanes, j);
            clash |= overlaps(lj, lj + wb);
          }
          if (clash) std::printf("E %d lanes %d, %d KiB: warp %d's tile\n", E, lanes, kib, i), ++bad;
        }
      }
    }
  }
  std::printf("bad %d\n", bad);
  return bad;
}
