// `bench_attention`: the attention benchmark as its own program (same options as `longnet bench attention`), so that
// a GPU machine can run it without building the whole toolkit.
#include <CLI/CLI.hpp>

#include "bench/bench_attention.h"
#include "bench/bench_main.h"

int main(int argc, char** argv) {
  CLI::App app{"Dilated attention: flash backend vs dense SDPA and a torch-composed implementation"};
  longnet::bench::AttentionBenchOptions options;
  longnet::bench::add_attention_bench_options(app, options);
  CLI11_PARSE(app, argc, argv);
  return longnet::bench::run_reporting_errors([&options] { return longnet::bench::run_attention_benchmark(options); });
}
