# Portable linking of the extension module for release wheels (release/README.md). Included by
# CMakeLists.txt only when RLFUSE_STATIC_LIBSTDCXX or RLFUSE_GLIBC is set; default builds never
# read this file.
#
#   RLFUSE_STATIC_LIBSTDCXX=ON   the host linker, libstdc++ and libgcc linked statically. Needs only
#                                libc/libm/libdl/librt/libpthread, but still the host glibc's symbol
#                                versions (pthread_* and dl* are GLIBC_2.34 on glibc >= 2.34).
#   RLFUSE_GLIBC=2.28            the final link is redone by release/zig_link.py with
#                                `zig cc -target <arch>-linux-gnu.2.28`: glibc symbol versions
#                                <= 2.28, gcc's libstdc++.a, zig's static libunwind,
#                                release/glibc_compat.c for the few newer glibc symbols that
#                                libstdc++.a references. Needs the `ziglang` Python package (or a
#                                `zig` on PATH).
#
# Both export only PyInit__C (release/exports.map), so the static C++ runtime never interposes on
# the libstdc++ that torch loads into the same process.

function(rlfuse_portable_link target)
  set(_release_dir "${CMAKE_CURRENT_FUNCTION_LIST_DIR}")
  set(_exports "${_release_dir}/exports.map")
  if(RLFUSE_GLIBC)
    if(NOT RLFUSE_GLIBC MATCHES "^2\\.[0-9]+$")
      message(FATAL_ERROR "RLFUSE_GLIBC must look like 2.28, got '${RLFUSE_GLIBC}'")
    endif()
    if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      message(FATAL_ERROR "RLFUSE_GLIBC needs g++ (its libstdc++.a is linked in), got ${CMAKE_CXX_COMPILER_ID}")
    endif()
    execute_process(
      COMMAND "${Python_EXECUTABLE}" "${_release_dir}/zig_link.py" --probe
      RESULT_VARIABLE _probe_rc OUTPUT_VARIABLE _probe_out ERROR_VARIABLE _probe_err
      OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT _probe_rc EQUAL 0)
      message(FATAL_ERROR "RLFUSE_GLIBC=${RLFUSE_GLIBC} needs zig: pip install ziglang "
                          "(release/requirements.txt)\n${_probe_out}${_probe_err}")
    endif()
    # The launcher receives the whole normal link command line and reruns it with zig.
    set_property(TARGET ${target} PROPERTY CXX_LINKER_LAUNCHER
                 "${Python_EXECUTABLE}" "${_release_dir}/zig_link.py" --glibc "${RLFUSE_GLIBC}"
                 --shim "${_release_dir}/glibc_compat.c" --exports "${_exports}" --)
    set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS
                 "${_exports}" "${_release_dir}/glibc_compat.c" "${_release_dir}/zig_link.py")
    message(STATUS "rlfuse: linking ${target} with zig for glibc ${RLFUSE_GLIBC} (${_probe_out}), "
                   "static libstdc++")
  else()
    target_link_options(${target} PRIVATE -static-libstdc++ -static-libgcc
                        "LINKER:--version-script=${_exports}")
    set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS "${_exports}")
    message(STATUS "rlfuse: linking ${target} with static libstdc++/libgcc")
  endif()
endfunction()
