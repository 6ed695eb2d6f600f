// `longnet ablate CONFIG`: one training run per (fusion strategy, missing-modality rate, seed) of the [ablate] table,
// each evaluated by held-out retrieval, tabulated side by side.
//
// Sweep folder <run.output_dir>/<run.name>-ablation/: runs/<strategy>-missing<rate>-seed<seed>/ (ordinary run
// folders), ablation.csv (one row per run), ablation.md (mean ± standard deviation over the seeds per strategy and
// rate, with the chance level) and, in the media build, ablation.png (R@1 of text → media per strategy and rate).
// Rerunning the command skips runs that finished (their summary.json is read back) and resumes interrupted ones.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "pipelines/experiment_config.h"

namespace longnet::pipelines {

struct AblationRun {
  std::string strategy;
  double missing_rate = 0;
  int64_t seed = 0;
  std::filesystem::path run_dir;
  nlohmann::json summary;  // the run's summary.json
};

struct AblationResult {
  std::filesystem::path dir;  // the sweep folder
  std::vector<AblationRun> runs;
};

// Trains (or reuses) every run of the sweep, then writes ablation.csv and ablation.md. ConfigError when the
// experiment is not a multimodal one.
AblationResult run_ablation(const ExperimentConfig& config);

// Mean and sample standard deviation of a retrieval figure ("text_to_media", "r1") over the seeds of one cell; the
// standard deviation is 0 for a single seed. Runs without that pair are skipped; count 0 when none has it.
struct CellStat {
  double mean = 0, stddev = 0, chance = 0;
  int64_t count = 0;
};
CellStat cell_stat(const AblationResult& result, const std::string& strategy, double missing_rate,
                   const std::string& pair, const std::string& metric);

// The retrieval pairs the sweep's runs report, text_to_media first.
std::vector<std::string> ablation_pairs(const AblationResult& result);

}  // namespace longnet::pipelines
