// The multimodal model on prepared shards: training (`longnet run` with run.task = "multimodal"), embeddings of a split
// (`longnet embed`, evaluation) and retrieval metrics on them.
//
// A training step runs the model twice on a batch: once on the captions alone (text stack → the text embedding and the
// LM logits) and once on the media alone (each medium's stack → its embedding; the fusion strategy over the media →
// the "media" embedding). Every modality's stack runs once; only the fusion runs per pass. The losses of [objectives]
// are then InfoNCE between each medium's embedding and the caption's, InfoNCE between the media embedding and the
// caption's (the one that depends on the fusion strategy), and the captions' language-model loss, summed with their
// weights. Samples lacking one side of a pair are left out of that pair's loss.
//
// Evaluation (every eval.every steps and at the end) embeds the eval.split shards and reports retrieval R@1/5/10 and
// ranks (pipelines/retrieval.h) for text↔video, text↔audio, text↔image, text↔media and video↔audio, each next to its
// chance level and the protocol, and zero-shot classification accuracy when eval.zero_shot_classes is set; the run
// folder's retrieval.json holds the last evaluation.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include "fusion/multimodal_model.h"
#include "pipelines/experiment_config.h"
#include "pipelines/run.h"
#include "pipelines/shards.h"

namespace longnet::pipelines {

// The runner behind run_experiment for run.task = "multimodal"; returns the run folder.
std::filesystem::path train_multimodal(const ExperimentConfig& config, const RunOptions& options);

// Embeddings of the samples of a shard folder, in its order (float32, CPU).
struct SplitEmbeddings {
  std::vector<std::string> ids;
  std::array<at::Tensor, modalities::kModalityCount> modality;  // (N, E), zero rows where absent; undefined: disabled
  at::Tensor present;        // (N, M) bool
  at::Tensor media;          // (N, E) the fusion of the sample's media (text left out); zero rows without media
  at::Tensor media_present;  // (N) bool
  at::Tensor labels;         // (N) int64 class labels (the shards' `label` field), -1 where a sample has none
  // Every caption of every sample with text (several per sample when the shards hold captions_ids): (K, E) and the
  // sample each belongs to (K) int64. Retrieval uses these rows for the text side.
  at::Tensor captions, caption_items;
  // Clips per video (prepare.eval_clips): above 1, `modality[video]` and `media` are normalised means over them.
  int64_t video_clips = 1;
};

struct EmbedOptions {
  int64_t batch_size = 16;
  int64_t max_samples = 0;    // 0: all
  double missing_rate = 0.0;  // media dropped before the media fusion, as in training (per-medium embeddings keep all)
  uint64_t seed = 0;          // of those drops
  bool bf16 = false;          // autocast on CUDA
  int64_t loader_workers = 2;
};

SplitEmbeddings embed_split(fusion::MultimodalModel& model, const ShardReader& reader, c10::Device device,
                            const EmbedOptions& options);

// Retrieval metrics for every pair the embeddings support (text ↔ each medium, text ↔ fused media, video ↔ audio;
// both directions; each side present in at least two samples): {"text_to_video": {"r1", "r5", "r10", "median_rank",
// "mean_rank", "queries", "gallery", "chance_r1", "protocol"}, ...}. Queries are the samples that have both sides; the
// gallery, every sample that has the target side (pipelines/retrieval.h gives the protocol).
nlohmann::json retrieval_report(const SplitEmbeddings& embeddings);

// Zero-shot classification (eval.zero_shot_classes): each class embedded by the text pass as the L2-normalised mean
// of its prompts' embeddings (the token ids `longnet prepare` wrote to <shards>/zero_shot_prompts.json); every labelled
// sample's fused media embedding and per-medium embeddings are classified by the nearest class.
// {"media": {"top1", "top5", "samples", "classes", "chance_top1"}, "video": {...}, ...} (percentages); DataError when
// the prompts file is missing or was made for other classes or templates.
nlohmann::json zero_shot_report(fusion::MultimodalModel& model, const SplitEmbeddings& embeddings,
                                const ExperimentConfig& config, c10::Device device);

// A trained model: the experiment of a run folder (its config.toml) with the weights of a checkpoint (the newest
// when `checkpoint` is empty). ConfigError when the folder is not a multimodal run or has no checkpoint.
struct TrainedModel {
  ExperimentConfig config;
  fusion::MultimodalModel model{nullptr};
  std::filesystem::path checkpoint;
  int64_t step = 0;
};
TrainedModel load_trained_model(const std::filesystem::path& run_dir, const std::filesystem::path& checkpoint,
                                c10::Device device);

}  // namespace longnet::pipelines
