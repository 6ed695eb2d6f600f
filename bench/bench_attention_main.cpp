// `bench_attention`: the attention benchmark as its own program (same options as `longnet bench attention`), so that
// a GPU machine can run it without building the whole toolkit.
#include <exception>
#include <iostream>

#include <CLI/CLI.hpp>

#include "bench/bench_attention.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"Dilated attention: flash backend vs dense SDPA and a torch-composed implementation"};
  longnet::bench::AttentionBenchOptions options;
  longnet::bench::add_attention_bench_options(app, options);
  CLI11_PARSE(app, argc, argv);
  try {
    return longnet::bench::run_attention_benchmark(options);
  } catch (const longnet::ConfigError& e) {
    std::cerr << "error: " << longnet::format_error_chain(e) << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << longnet::format_error_chain(e) << "\n";
    return 1;
  }
}
