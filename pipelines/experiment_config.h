// An experiment: everything one `longnet run` needs, read from a TOML file once, validated, then passed around as
// typed structs. Nothing below this layer sees TOML.
//
//   auto exp = pipelines::load_experiment("experiments/quickstart.toml", {"train.steps=20"});
//   std::cout << pipelines::to_toml(exp);   // the fully resolved config, defaults filled in
//
// Tables: [run] [model] [attention] [data] [train] [eval], and for the multimodal model [fusion] and
// [modalities.text|image|video|audio] (fusion/fusion_config.h). Unknown keys, wrong types, out-of-range values and
// inconsistent combinations are ConfigErrors that name file:line:col and the dotted key.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "attention/dilated_attention.h"
#include "fusion/block.h"
#include "fusion/fusion_config.h"
#include "fusion/model_config.h"

namespace longnet::pipelines {

struct RunConfig {
  std::string name = "experiment";
  std::string task = "lm";         // "lm": causal language modelling on a text corpus; "multimodal": the model of
                                   // [fusion] and [modalities.*] (at least one modality enabled)
  int64_t seed = 0;
  std::string device = "auto";     // "auto" | "cpu" | "cuda"
  std::string output_dir = "runs"; // the run folder is <output_dir>/<name>
};

struct DataConfig {
  std::vector<std::string> corpus;     // text files (UTF-8, read as bytes)
  int64_t sequence_length = 1024;      // N, tokens per training sample
  double validation_fraction = 0.1;    // tail of the corpus held out, in (0, 0.5]
};

struct TrainConfig {
  int64_t steps = 100;
  int64_t batch_size = 8;
  int64_t grad_accumulation = 1;
  double lr = 1e-3;
  double min_lr_ratio = 0.1;           // cosine decays to lr · min_lr_ratio
  int64_t warmup_steps = 10;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double grad_clip = 1.0;              // global norm; 0 disables
  std::string precision = "fp32";      // "fp32" | "bf16" (autocast, CUDA only)
  int64_t log_every = 10;
  int64_t checkpoint_every = 0;        // 0: only at the end
  int64_t keep_checkpoints = 2;
};

struct EvalConfig {
  int64_t every = 50;                  // steps between evaluations; 0: only at the end
  int64_t batches = 8;
};

struct ExperimentConfig {
  std::filesystem::path source;        // the file it was read from
  RunConfig run;
  fusion::ModelConfig model;
  fusion::AttentionConfig attention;  // the dilated pattern plus the attention module's options
  DataConfig data;
  TrainConfig train;
  EvalConfig eval;
  fusion::MultimodalConfig multimodal;  // [fusion] and [modalities.*]
};

ExperimentConfig load_experiment(const std::filesystem::path& file, const std::vector<std::string>& overrides = {});
// Same, from text (no `base` inheritance); `source_name` appears in error messages.
ExperimentConfig parse_experiment(const std::string& text, const std::string& source_name,
                                  const std::vector<std::string>& overrides = {});

// The resolved config as TOML; parse_experiment(to_toml(c)) gives back c.
std::string to_toml(const ExperimentConfig& config);

}  // namespace longnet::pipelines
