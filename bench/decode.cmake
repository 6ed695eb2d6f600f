# bench_decode: video decode + sample + convert throughput against the ffmpeg command line (no torch).
if(LONGNET_MEDIA)
  longnet_add_executable(bench_decode
    SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/bench_decode.cpp
    DEPS longnet_media CLI11::CLI11 nlohmann_json::nlohmann_json PkgConfig::FFMPEG)
  set_target_properties(bench_decode PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
endif()
