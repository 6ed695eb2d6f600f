// `longnet run`: executes an experiment and writes its run folder.
//
// Run folder (<run.output_dir>/<run.name>/): config.toml (the resolved config), metrics.jsonl (one JSON object per
// logged step and evaluation), tensorboard/ (the same scalars as TensorBoard event files), checkpoints/ (see
// pipelines/training.h), summary.json (final metrics). Files are written atomically.
//
// Resuming (`longnet run --resume RUN_DIR`): the run continues in RUN_DIR from its newest checkpoint — model,
// optimizer, schedule, data order and random state — so that on the CPU it ends with the same metrics as a run that
// was never interrupted.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "pipelines/experiment_config.h"

namespace longnet::pipelines {

struct RunOptions {
  std::filesystem::path resume;  // a run folder to continue; empty: a new run folder
  // Fault injection, for tests of the failure policy (train.skip_nonfinite, train.skip_oom): at these 1-based steps
  // the loss is made NaN, or an out-of-memory error is raised before the backward.
  std::vector<int64_t> inject_nonfinite_steps{}, inject_oom_steps{};
};

// Throws ConfigError unless the experiment can run on `ranks` processes: train.sequence_parallel must divide them.
// `longnet run` checks this before spawning ranks; run_experiment checks it again for launcher-started ranks.
void check_ranks(const ExperimentConfig& config, int ranks);

// Runs the experiment's task to completion; returns the run folder. Throws ConfigError for settings the machine
// cannot honour (e.g. device = "cuda" without a GPU), DataError/IoError for data and file problems.
std::filesystem::path run_experiment(const ExperimentConfig& config, const RunOptions& options = {});

}  // namespace longnet::pipelines
