# bench_fusion: forward + backward of a ~100M-parameter multimodal model with the per-modality stacks sequential vs on
# separate CUDA streams. Needs a CUDA device to run (it says so and exits 1 without one); builds anywhere.
longnet_add_executable(bench_fusion TORCH
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/bench_fusion.cpp
  DEPS longnet_fusion longnet_core CLI11::CLI11 nlohmann_json::nlohmann_json)
set_target_properties(bench_fusion PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)

# bench_mlp: the GELU MLP forward + backward, torch operators vs GEMM epilogues (fusion/gelu_mlp.h), piece by piece.
longnet_add_executable(bench_mlp TORCH
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/bench_mlp.cpp
  DEPS longnet_fusion longnet_core CLI11::CLI11 nlohmann_json::nlohmann_json)
set_target_properties(bench_mlp PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
