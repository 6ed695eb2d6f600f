# One place for the properties every project target gets: standard, warnings, PCH, include root.

set(LONGNET_WARNINGS -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor)
if(LONGNET_WERROR)
  list(APPEND LONGNET_WARNINGS -Werror)
endif()

# One relocation model everywhere, so that the precompiled header below is valid for every target.
set(CMAKE_POSITION_INDEPENDENT_CODE ON)

# The precompiled torch header is built once, on a tiny object library, and reused by every torch TU.
if(LONGNET_PCH)
  add_library(longnet_torch_pch OBJECT ${PROJECT_SOURCE_DIR}/cmake/pch_anchor.cpp)
  target_link_libraries(longnet_torch_pch PUBLIC torch)
  target_compile_options(longnet_torch_pch PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${LONGNET_WARNINGS}>)
  target_compile_definitions(longnet_torch_pch PUBLIC
    $<$<BOOL:${LONGNET_CUDA}>:LONGNET_WITH_CUDA=1>
    $<$<BOOL:${LONGNET_MEDIA}>:LONGNET_WITH_MEDIA=1>)
  target_precompile_headers(longnet_torch_pch PRIVATE <torch/torch.h>)
endif()

function(longnet_target_defaults target)
  target_include_directories(${target} PUBLIC $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}>)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${LONGNET_WARNINGS}>
    $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings --expt-relaxed-constexpr>)
  target_compile_definitions(${target} PUBLIC
    $<$<BOOL:${LONGNET_CUDA}>:LONGNET_WITH_CUDA=1>
    $<$<BOOL:${LONGNET_MEDIA}>:LONGNET_WITH_MEDIA=1>)
endfunction()

# Links torch and reuses the precompiled <torch/torch.h>.
function(longnet_use_torch target visibility)
  target_link_libraries(${target} ${visibility} torch)
  if(LONGNET_PCH)
    target_precompile_headers(${target} REUSE_FROM longnet_torch_pch)
  endif()
endfunction()

# longnet_add_library(NAME SOURCES ... [DEPS ...] [PRIVATE_DEPS ...] [TORCH])
# TORCH: the target links torch and reuses the precompiled <torch/torch.h>.
function(longnet_add_library name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  longnet_target_defaults(${name})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  if(ARG_TORCH)
    longnet_use_torch(${name} PUBLIC)
  endif()
endfunction()

function(longnet_add_executable name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  longnet_target_defaults(${name})
  # Executables compile as PIC like the libraries (instead of PIE), so the one precompiled header fits them too.
  set_target_properties(${name} PROPERTIES POSITION_INDEPENDENT_CODE OFF)
  target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fPIC>)
  target_link_libraries(${name} PRIVATE ${ARG_DEPS})
  if(ARG_TORCH)
    longnet_use_torch(${name} PRIVATE)
  endif()
endfunction()

# longnet_add_test_suite(NAME SOURCES ... DEPS ... [LABELS ...] [TORCH])
# One binary per area (LibTorch links are slow); every TEST_CASE becomes its own ctest entry.
include(Catch OPTIONAL)
function(longnet_add_test_suite name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS;LABELS" ${ARGN})
  longnet_add_executable(${name} SOURCES ${ARG_SOURCES} DEPS longnet_test_main ${ARG_DEPS})
  if(ARG_TORCH)
    longnet_use_torch(${name} PRIVATE)
  endif()
  catch_discover_tests(${name}
    TEST_PREFIX "${name}."
    # One intra-op thread per test: ctest runs tests in parallel, and torch's default thread pool would oversubscribe
    # the cores several times over (a 7 s suite took 58 s on 2 busy cores).
    PROPERTIES LABELS "${ARG_LABELS}" ENVIRONMENT "OMP_NUM_THREADS=1"
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
endfunction()
