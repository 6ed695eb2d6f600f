# bench_loader: batches/s and CPU time a batch of pipelines::Loader on prepared shards (any machine).
longnet_add_executable(bench_loader TORCH
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/bench_loader.cpp
  DEPS longnet_pipelines longnet_core CLI11::CLI11 nlohmann_json::nlohmann_json)
set_target_properties(bench_loader PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
