// The screen's error bound measured on the current CUDA device (screen_check_cuda.cu). Plain C++:
// module.cc includes it in the _cuda module only.
#pragma once

#include <cstdint>

namespace jax_router {
namespace cuda {

struct ScreenError {
  float max_error;          // max |screen_sigmoid(x) - sigmoid(x)| over non-NaN results; -1 on a CUDA error
  float bound;              // kScreenSigmoidError, which the forward assumes
  uint32_t nan_mismatches;  // inputs where one result is NaN and the other not
};

ScreenError ScreenSigmoidError();

}  // namespace cuda
}  // namespace jax_router
