// `longnet run`: executes an experiment and writes its run folder.
//
// Run folder (<run.output_dir>/<run.name>/): config.toml (the resolved config), metrics.jsonl (one JSON object per
// logged step and evaluation), checkpoints/, summary.json (final metrics). Files are written atomically.
#pragma once

#include <filesystem>

#include "pipelines/experiment_config.h"

namespace longnet::pipelines {

// Runs the experiment's task to completion; returns the run folder. Throws ConfigError for settings the machine
// cannot honour (e.g. device = "cuda" without a GPU), DataError/IoError for data and file problems.
std::filesystem::path run_experiment(const ExperimentConfig& config);

}  // namespace longnet::pipelines
