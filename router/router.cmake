# router/router.cmake - build rules of the DICOM front door, included by the
# top-level CMakeLists.txt. All DCMTK (C++) code lives in sp_dicom; the
# Part-10 framing (sp_part10, in sp_common) and the service handlers with the cluster
# backend (sp_router) are C.
find_package(DCMTK CONFIG REQUIRED)
find_package(OpenSSL 3 REQUIRED)

# The gatekeeper (pure C, no DCMTK): the event loop that holds connections
# until a whole request is buffered, with DICOM TLS (OpenSSL) driven in it.
# Its own library so test_gate links it.
add_library(sp_gate STATIC ${CMAKE_SOURCE_DIR}/router/gate.c ${CMAKE_SOURCE_DIR}/router/tls.c)
target_include_directories(sp_gate PUBLIC ${CMAKE_SOURCE_DIR}/router)
target_compile_options(sp_gate PRIVATE ${SP_C_WARNINGS})
target_link_libraries(sp_gate PUBLIC sp_common Threads::Threads OpenSSL::SSL OpenSSL::Crypto)
if(TARGET test_gate)
  target_link_libraries(test_gate PRIVATE sp_gate)
endif()

# The DICOM access rules (pure C): their own library so test_access links it.
add_library(sp_access STATIC ${CMAKE_SOURCE_DIR}/router/access.c)
target_include_directories(sp_access PUBLIC ${CMAKE_SOURCE_DIR}/router)
target_compile_options(sp_access PRIVATE ${SP_C_WARNINGS})
target_link_libraries(sp_access PUBLIC sp_common Threads::Threads)
if(TARGET test_access)
  target_link_libraries(test_access PRIVATE sp_access)
endif()

# Part-10 framing of stored instances lives in sp_common (common/part10.c):
# nodes cut an object's metadata out of it too. sp_part10 names it here.
add_library(sp_part10 INTERFACE)
target_link_libraries(sp_part10 INTERFACE sp_common)

add_library(sp_dicom STATIC ${CMAKE_SOURCE_DIR}/router/dicom_server.cc
  ${CMAKE_SOURCE_DIR}/router/dicom_services.cc ${CMAKE_SOURCE_DIR}/router/dicom_json.cc)
target_include_directories(sp_dicom PUBLIC ${CMAKE_SOURCE_DIR}/router)
target_compile_options(sp_dicom PRIVATE -Wall -Wextra -Wshadow -Wno-unused-parameter
  $<$<BOOL:${SP_WERROR}>:-Werror>)
target_link_libraries(sp_dicom
  PUBLIC sp_gate sp_part10 sp_common Threads::Threads
  PRIVATE DCMTK::dcmnet DCMTK::dcmtls DCMTK::dcmdata DCMTK::dcmjpeg DCMTK::dcmjpls DCMTK::dcmimage
          DCMTK::dcmimgle DCMTK::oflog DCMTK::ofstd)

# The service handlers (the archive's policy) and the cluster backend, shared
# by the router and the adapter's test harness.
add_library(sp_router STATIC ${CMAKE_SOURCE_DIR}/router/scp.c
  ${CMAKE_SOURCE_DIR}/router/backend.c)
target_compile_options(sp_router PRIVATE ${SP_C_WARNINGS})
target_link_libraries(sp_router PUBLIC sp_dicom sp_part10 sp_access sp_common)

# The HTTP front door (libmicrohttpd, GnuTLS for HTTPS), its users and
# tokens (libsodium), and the DICOMweb handlers over the same backend.
add_library(sp_web STATIC ${CMAKE_SOURCE_DIR}/router/http.c ${CMAKE_SOURCE_DIR}/router/auth.c
  ${CMAKE_SOURCE_DIR}/router/dicomweb.c)
target_compile_options(sp_web PRIVATE ${SP_C_WARNINGS})
target_link_libraries(sp_web PUBLIC sp_router sp_dicom sp_common PkgConfig::MHD
  PkgConfig::JANSSON z)

# Test harness: a C program that serves the adapter from memory. The pytest
# script tests/cluster/test_dicom_adapter.py drives it with DCMTK's tools; it
# is registered as cluster.test_dicom_adapter by the glob in CMakeLists.txt.
add_executable(dicom_harness ${CMAKE_SOURCE_DIR}/tests/tools/dicom_harness.c)
target_compile_options(dicom_harness PRIVATE ${SP_C_WARNINGS})
target_link_libraries(dicom_harness PRIVATE sp_router sp_dicom sp_common)
set_target_properties(dicom_harness PROPERTIES LINKER_LANGUAGE CXX)

# The router: configuration and start-up over the handlers and the adapter.
add_executable(shardpacs-router ${CMAKE_SOURCE_DIR}/router/router.c)
target_compile_options(shardpacs-router PRIVATE ${SP_C_WARNINGS})
target_link_libraries(shardpacs-router PRIVATE sp_web sp_router sp_dicom sp_common)
set_target_properties(shardpacs-router PROPERTIES LINKER_LANGUAGE CXX)

# tests/unit/test_part10.c is built by the unit-test glob in CMakeLists.txt
# (which runs before this file is included); it also needs the framing.
if(TARGET test_part10)
  target_link_libraries(test_part10 PRIVATE sp_part10)
endif()
