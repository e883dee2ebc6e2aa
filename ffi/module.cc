// Python modules `jax_router._cpu` and `jax_router._cuda`: one source, built once per platform
// (CMakeLists.txt defines JR_MODULE and JR_HANDLER_SUFFIX). Each exposes its handlers as FFI
// capsules under the same target names, so one ffi_call runs on whichever platform the
// computation lands on.
#include <type_traits>

#include "nanobind/nanobind.h"
#include "xla/ffi/api/api.h"
#include "xla/ffi/api/c_api.h"
#include "dispatch_math.h"
#include "routing_math.h"

#if !defined(JR_MODULE) || !defined(JR_HANDLER_SUFFIX)
#error "build through CMakeLists.txt, which defines JR_MODULE and JR_HANDLER_SUFFIX"
#endif

#define JR_CAT2(a, b) a##b
#define JR_CAT(a, b) JR_CAT2(a, b)
#define JR_HANDLER(name) JR_CAT(name, JR_HANDLER_SUFFIX)

// Target name -> handler symbol, one line per FFI target.
#define JR_TARGETS(X)                                 \
  X("jax_router_fwd", JaxRouterFwd)                   \
  X("jax_router_qb_fwd", JaxRouterQbFwd)              \
  X("jax_router_bwd", JaxRouterBwd)                   \
  X("jax_router_aux_scores_fwd", JaxRouterAuxScoresFwd) \
  X("jax_router_aux_scores_bwd", JaxRouterAuxScoresBwd) \
  X("jax_router_dispatch_plan", JaxRouterDispatchPlan)  \
  X("jax_router_permute", JaxRouterPermute)              \
  X("jax_router_unpermute", JaxRouterUnpermute)          \
  X("jax_router_unpermute_bwd", JaxRouterUnpermuteBwd)

#define JR_DECLARE(target, name) XLA_FFI_DECLARE_HANDLER_SYMBOL(JR_HANDLER(name));
JR_TARGETS(JR_DECLARE)
#undef JR_DECLARE

namespace nb = nanobind;

template <typename T>
static nb::capsule Capsule(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

NB_MODULE(JR_MODULE, m) {
  m.def("registrations", [] {
    nb::dict d;
#define JR_ENTRY(target, name) d[target] = Capsule(JR_HANDLER(name));
    JR_TARGETS(JR_ENTRY)
#undef JR_ENTRY
    return d;
  });
  // The XLA FFI API version of the headers this module was compiled against: jax_router
  // registers the handlers only with a jaxlib whose FFI API is at least this new.
  m.def("ffi_api_version", [] { return nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); });
  // The dispatch plan's workspace in int32 elements: jax_router/dispatch.py sizes it with its
  // own copy of the formula (a test compares the two).
  m.def("dispatch_plan_workspace_size", [](int64_t n, int64_t experts) {
    return jax_router::dispatch::plan_workspace_size(n, experts);
  });
  // The C++ enums' values by name, for the test that Python sends the same ones.
  m.def("enum_values", [] {
    nb::dict fns, modes, formats;
#define JR_FN(name, value, py) fns[#py] = value;
    JR_SCORE_FUNCTIONS(JR_FN)
#undef JR_FN
    modes["compact"] = static_cast<int>(jax_router::OutputMode::kCompact);
    modes["map"] = static_cast<int>(jax_router::OutputMode::kMap);
    modes["dense"] = static_cast<int>(jax_router::OutputMode::kDense);
    formats["bytemap"] = static_cast<int>(jax_router::MapFormat::kBytemap);
    formats["bitmap_u8"] = static_cast<int>(jax_router::MapFormat::kBitmapU8);
    nb::dict d;
    d["score_function"] = fns;
    d["output_mode"] = modes;
    d["map_format"] = formats;
    return d;
  });
}
