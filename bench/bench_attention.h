// Attention benchmark: the fused and flash backends against dense torch SDPA and a torch-composed dilated attention (one flash
// call per branch and head offset, merged by torch ops, autograd through it: how public Python implementations do
// it), in one process on one card. Configurations are those of BENCHMARKS.md (`local5`, `wide`, `causal`).
//
// Usage (apps/longnet): longnet bench attention --config local5 --json bench/results/h100_attention_local5.json
// Every record holds the parameters, device, dtype, torch/CUDA/cuDNN versions, git commit, median/p10/p90 ms over the
// repetitions (CUDA events, after warm-up), effective TFLOP/s (Σ_i (N/w_i)·H·4·(w_i/r_i)²·D, ×3.5 for
// forward+backward), tokens/s, peak memory and the maximum error against the composed implementation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace longnet::bench {

struct AttentionBenchOptions {
  std::string config = "local5";                    // local5 | wide | causal
  std::vector<int64_t> lengths;                     // empty: 32K, 64K, ... doubling up to max_length
  int64_t max_length = int64_t{1} << 22;            // training lengths stop here or at the first out-of-memory
  int64_t dense_max_length = int64_t{1} << 17;      // dense SDPA runs up to this length
  std::vector<int64_t> inference_lengths{int64_t{1} << 20, int64_t{1} << 21, int64_t{1} << 22, int64_t{1} << 23};
  std::string mode = "both";                        // fwd | fwdbwd | both (training lengths)
  std::string mix = "lse";                          // lse | head_split (attention.mix)
  std::vector<std::string> methods{"fused", "ours", "composed", "dense_sdpa"};  // which ones run (ours = flash)
  bool inference = true;                            // also forward under no-grad at inference_lengths
  int repetitions = 10;
  int warmup = 3;
  double warmup_seconds = 0;  // after `warmup` runs, keep running untimed until this much time has passed, so that
                              // every measurement starts in the card's sustained (power-capped) clock state
  std::string output_json;                          // empty: table only
  std::string git_commit;                           // empty: $LONGNET_GIT_COMMIT, else "unknown"
};

// Registers the benchmark's command-line options (with their defaults in --help) on `app`, writing into `options`.
// Shared by `longnet bench attention` and the standalone `bench_attention` program.
void add_attention_bench_options(CLI::App& app, AttentionBenchOptions& options);

// Runs the benchmark on the current CUDA device, prints a table and writes the JSON records. Returns 0 on success,
// 1 when a correctness check failed (results are still written). Throws longnet::Error without a CUDA device or
// when the flash backend is missing from this build.
int run_attention_benchmark(const AttentionBenchOptions& options);

}  // namespace longnet::bench
