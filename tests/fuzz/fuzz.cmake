# tests/fuzz/fuzz.cmake - libFuzzer targets (fuzz_dsscan, fuzz_wire,
# fuzz_match, fuzz_part10), built when the C compiler is clang. Included from the top
# CMakeLists.txt; tests/fuzz/run.sh configures a separate build-fuzz folder
# with CC=clang -DSP_FUZZ=ON and builds only these targets (the router's
# DCMTK code is never built there).
#
# The common/ sources are compiled a second time into sp_common_fuzz with
# coverage instrumentation and ASan/UBSan, since libFuzzer only steers by
# code built with -fsanitize=fuzzer-no-link. Without SP_FUZZ (a plain clang
# build) the targets exist but are left out of `all`.
option(SP_FUZZ "Build the libFuzzer targets as part of all (needs clang)" OFF)

if(SP_FUZZ AND NOT CMAKE_C_COMPILER_ID STREQUAL "Clang")
  message(FATAL_ERROR "SP_FUZZ=ON needs clang: configure with CC=clang CXX=clang++")
endif()

if(CMAKE_C_COMPILER_ID STREQUAL "Clang")
  if(SP_FUZZ)
    set(SP_FUZZ_EXCLUDE "")
  else()
    set(SP_FUZZ_EXCLUDE EXCLUDE_FROM_ALL)
  endif()
  set(SP_FUZZ_FLAGS -fsanitize=fuzzer-no-link,address,undefined
    -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g)

  get_target_property(SP_COMMON_SOURCES sp_common SOURCES)
  add_library(sp_common_fuzz STATIC ${SP_FUZZ_EXCLUDE} ${SP_COMMON_SOURCES})
  target_include_directories(sp_common_fuzz PUBLIC ${CMAKE_SOURCE_DIR}/common)
  target_compile_options(sp_common_fuzz PRIVATE ${SP_FUZZ_FLAGS})
  # The same definitions and libraries as sp_common itself.
  get_target_property(SP_COMMON_DEFS sp_common COMPILE_DEFINITIONS)
  if(SP_COMMON_DEFS)
    target_compile_definitions(sp_common_fuzz PRIVATE ${SP_COMMON_DEFS})
  endif()
  get_target_property(SP_COMMON_LIBS sp_common LINK_LIBRARIES)
  target_link_libraries(sp_common_fuzz PUBLIC ${SP_COMMON_LIBS})

  foreach(name fuzz_dsscan fuzz_wire fuzz_match fuzz_part10)
    add_executable(${name} ${SP_FUZZ_EXCLUDE} ${CMAKE_SOURCE_DIR}/tests/fuzz/${name}.c)
    target_compile_options(${name} PRIVATE ${SP_FUZZ_FLAGS} ${SP_C_WARNINGS})
    target_link_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_libraries(${name} PRIVATE sp_common_fuzz)
  endforeach()

  # Writes the wire seed corpus (tests/fuzz/corpus/fuzz_wire) from real
  # encodings; run by hand when the messages change.
  add_executable(gen_wire_corpus EXCLUDE_FROM_ALL ${CMAKE_SOURCE_DIR}/tests/fuzz/gen_wire_corpus.c)
  target_link_libraries(gen_wire_corpus PRIVATE sp_common_fuzz)
  target_link_options(gen_wire_corpus PRIVATE -fsanitize=address,undefined)
endif()
