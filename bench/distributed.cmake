# bench_sequence_parallel: LongNet sequence parallelism on 1, 2 or 4 GPUs of one host (it spawns one rank per GPU;
# NCCL). Built with the other benchmarks; without a CUDA device it exits with a message.
longnet_add_executable(bench_sequence_parallel TORCH
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/bench_sequence_parallel.cpp
  DEPS longnet_distributed longnet_attention longnet_core CLI11::CLI11 nlohmann_json::nlohmann_json)
set_target_properties(bench_sequence_parallel PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
