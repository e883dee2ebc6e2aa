// Python module `jax_router._cpu`: the CPU handlers (router_cpu.cc, aux_loss_cpu.cc) as FFI
// capsules, under the same target names as the CUDA module (cuda_module.cc).
#include <type_traits>

#include "nanobind/nanobind.h"
#include "xla/ffi/api/api.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxRouterFwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxRouterBwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxRouterAuxScoresFwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxRouterAuxScoresBwdCpu);

template <typename T>
static nb::capsule Capsule(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

NB_MODULE(_cpu, m) {
  m.def("registrations", [] {
    nb::dict d;
    d["jax_router_fwd"] = Capsule(JaxRouterFwdCpu);
    d["jax_router_bwd"] = Capsule(JaxRouterBwdCpu);
    d["jax_router_aux_scores_fwd"] = Capsule(JaxRouterAuxScoresFwdCpu);
    d["jax_router_aux_scores_bwd"] = Capsule(JaxRouterAuxScoresBwdCpu);
    return d;
  });
  // The XLA FFI API version of the headers this module was compiled against: jax_router
  // registers the handlers only with a jaxlib whose FFI API is at least this new.
  m.def("ffi_api_version", [] { return nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); });
}
