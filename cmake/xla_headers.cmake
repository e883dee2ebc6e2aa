# XLA FFI headers. XLA rejects a handler compiled against a newer FFI API than its own (and on
# CPU that stops the whole backend from starting), so one build must use the headers of the
# OLDEST jaxlib the package supports, whatever jax the build environment has: they are taken
# from that jaxlib's wheel on the package index at configure time (pinned by version and hash).
# Offline, or to build against the jaxlib you run, pass its headers instead:
#   -DJAX_ROUTER_XLA_INCLUDE_DIR=$(python -c "import jax.ffi; print(jax.ffi.include_dir())")
# The floor is also in pyproject.toml (jaxlib>=) and jax_router/_ffi.py (JAXLIB_FLOOR).
set(JAX_ROUTER_JAXLIB_FLOOR "0.8.0")
set(_floor_wheel "jaxlib-0.8.0-cp311-cp311-manylinux_2_27_x86_64.whl")
set(_floor_sha256 "ff53e8baf978f6b7c4076215af78f0ba969cac434ed2f72565d87e38c23f00e7")
set(JAX_ROUTER_XLA_INCLUDE_DIR "" CACHE PATH
    "XLA FFI headers to build against (default: those of jaxlib ${JAX_ROUTER_JAXLIB_FLOOR})")
if(JAX_ROUTER_XLA_INCLUDE_DIR)
  set(XLA_DIR "${JAX_ROUTER_XLA_INCLUDE_DIR}")
  # Not sticky: a later configure without it goes back to the floor's headers.
  unset(JAX_ROUTER_XLA_INCLUDE_DIR CACHE)
else()
  set(_floor_dir "${CMAKE_BINARY_DIR}/jaxlib-${JAX_ROUTER_JAXLIB_FLOOR}")
  set(XLA_DIR "${_floor_dir}/jaxlib/include")
  if(NOT EXISTS "${XLA_DIR}/xla/ffi/api/ffi.h")
    string(CONCAT _offline_hint
      "Offline, pass the headers of a jaxlib no newer than the one you will run, e.g. the "
      "installed one: -DJAX_ROUTER_XLA_INCLUDE_DIR=$(python -c \"print(__import__('jax').ffi"
      ".include_dir())\") (pip: -Ccmake.define.JAX_ROUTER_XLA_INCLUDE_DIR=..., make: "
      "XLA_INCLUDE_DIR=...).")
    if(NOT EXISTS "${_floor_dir}/${_floor_wheel}")
      message(STATUS "Downloading jaxlib==${JAX_ROUTER_JAXLIB_FLOOR} for its XLA FFI headers")
      # Any platform's wheel has the same headers: ask for one fixed file so its hash is known.
      execute_process(
        COMMAND "${Python_EXECUTABLE}" -m pip download --quiet --no-deps --only-binary=:all:
                --platform manylinux_2_27_x86_64 --python-version 3.11 --implementation cp
                --abi cp311 --dest "${_floor_dir}" "jaxlib==${JAX_ROUTER_JAXLIB_FLOOR}"
        RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
      if(NOT _rc EQUAL 0 OR NOT EXISTS "${_floor_dir}/${_floor_wheel}")
        message(FATAL_ERROR "Could not download ${_floor_wheel} from the package index to get "
                "the XLA FFI headers of the oldest supported jaxlib:\n${_out}${_err}\n"
                "${_offline_hint}")
      endif()
    endif()
    file(SHA256 "${_floor_dir}/${_floor_wheel}" _sha)
    if(NOT _sha STREQUAL _floor_sha256)
      file(REMOVE "${_floor_dir}/${_floor_wheel}")
      message(FATAL_ERROR "${_floor_wheel}: SHA256 ${_sha}, expected ${_floor_sha256}")
    endif()
    file(ARCHIVE_EXTRACT INPUT "${_floor_dir}/${_floor_wheel}" DESTINATION "${_floor_dir}"
         PATTERNS "jaxlib/include/*")
    if(NOT EXISTS "${XLA_DIR}/xla/ffi/api/ffi.h")
      message(FATAL_ERROR "${_floor_wheel} has no jaxlib/include/xla/ffi/api/ffi.h. "
              "${_offline_hint}")
    endif()
  endif()
endif()
message(STATUS "XLA FFI headers: ${XLA_DIR}")
