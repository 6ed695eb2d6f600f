// An experiment: everything one `longnet run` needs, read from a TOML file once, validated, then passed around as
// typed structs. Nothing below this layer sees TOML.
//
//   auto exp = pipelines::load_experiment("experiments/quickstart.toml", {"train.steps=20"});
//   std::cout << pipelines::to_toml(exp);   // the fully resolved config, defaults filled in
//
// Tables: [run] [model] [attention] [data] [train] [eval], and for the multimodal model [fusion],
// [modalities.text|image|video|audio] (fusion/fusion_config.h), [prepare] (how `longnet prepare` turns the manifest's
// media into shards), [objectives] (loss weights) and [ablate] (the sweep of `longnet ablate`). Unknown keys, wrong
// types, out-of-range values and inconsistent combinations are ConfigErrors that name file:line:col and the dotted
// key. Relative paths are taken from the working directory.
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

// One dataset of a training mixture ([data] sources).
struct DataSource {
  std::string manifest;  // what `longnet prepare` reads (optional when the shards exist)
  std::string shards;    // <shards>/train is drawn from
  double weight = 1.0;   // relative sampling weight
};

struct DataConfig {
  // run.task = "lm"
  std::vector<std::string> corpus;     // text files (UTF-8, read as bytes)
  int64_t sequence_length = 1024;      // N, tokens per training sample
  double validation_fraction = 0.1;    // tail of the corpus held out, in (0, 0.5]
  // run.task = "multimodal": the manifest (pipelines/manifest.h) that `longnet prepare` reads, the shard folder it
  // writes (<shards>/train, <shards>/val, <shards>/test) and training reads, and the SentencePiece model of the
  // captions (`longnet prepare` trains it from the train split's captions when the file does not exist).
  std::string manifest;
  std::string shards;
  std::string tokenizer;
  int64_t loader_workers = 2;          // threads reading and collating batches
  int64_t prefetch = 4;                // batches ready ahead of the training step
  int64_t bucket_batches = 0;          // length bucketing window in batches; 0: off
  // Each media modality (image, video, audio) of a sample is dropped with this probability, in training batches and
  // in the fused media embedding of evaluation; a sample keeps at least one of the media it has. Drops are a function
  // of (run.seed, epoch, batch, sample): a resumed run drops the same ones.
  double missing_rate = 0.0;
  // `longnet prepare` fails, and training refuses the shards, when more than this fraction of the manifest's samples
  // could not be decoded (the skipped ones are listed in <shards>/bad_samples.jsonl and the run's bad_media.jsonl).
  double max_bad_fraction = 0.1;
  // Several datasets mixed by weight (pipelines/loader.h, mixing): `longnet prepare` prepares each, training draws
  // from their train splits, evaluation, zero-shot and `longnet embed` use the first (manifest and shards above are
  // then the first source's; setting them as well is an error). Empty: the one dataset of manifest and shards.
  std::vector<DataSource> sources;
  // Samples per training epoch; 0: every sample once (one dataset) or the sources' total (several). > 0 draws
  // epochs as mixing does, with small sources repeating.
  int64_t epoch_samples = 0;
};

// The datasets training draws from: data.sources, or the one of data.manifest and data.shards.
std::vector<DataSource> training_sources(const DataConfig& data);

// [prepare]: options of `longnet prepare` (pipelines/prepare.h). The patch sizes here fix the patch_dim of
// [modalities.*]: image and video P·P·3 (video times the tubelet), audio mel_bins · mel_frames_per_patch.
struct PrepareConfig {
  int64_t workers = 0;                 // 0: one per hardware thread
  std::string on_bad = "skip";         // "skip" | "fail"
  int64_t text_max_tokens = 64;        // caption ids kept, BOS and EOS included
  int64_t tokenizer_vocab_size = 512;  // of the tokenizer trained when data.tokenizer does not exist
  int64_t image_size = 224;            // square, shorter side resized then centre-cropped
  int64_t image_patch = 16;
  int64_t video_size = 224;            // frames resized to this square
  int64_t video_frames = 8;            // sampled uniformly over the clip (when video_fps = 0)
  double video_fps = 0.0;              // > 0: sample at this rate instead
  double video_clip_seconds = 0.0;     // > 0: frames come from a window this long (centred for training)
  int64_t eval_clips = 1;              // clips of held-out videos, spread over the video; evaluation averages them
  int64_t train_clips = 1;             // clips of training videos, spread over the video; each epoch takes one
  int64_t video_patch = 16;
  int64_t video_tubelet = 1;           // frames per patch
  double audio_max_seconds = 30.0;     // longer audio is cut
  double audio_seconds = 0.0;          // > 0: every clip fitted to this length (pipelines/prepare.h)
  std::string audio_fit = "pad";       // shorter clips: "pad" (silence) | "loop" | "crop" (left short)
  int64_t mel_bins = 80;
  int64_t mel_frames_per_patch = 16;   // 10 ms frames
  int64_t max_shard_mb = 256;

  // Values per patch of the prepared image, video and audio patches.
  int64_t image_patch_dim() const { return image_patch * image_patch * 3; }
  int64_t video_patch_dim() const { return video_patch * video_patch * 3 * video_tubelet; }
  int64_t audio_patch_dim() const { return mel_bins * mel_frames_per_patch; }
  bool operator==(const PrepareConfig&) const = default;
};

// [objectives]: weights of the multimodal training losses (0 turns one off; pairs with a disabled modality are
// ignored). <m>_text: InfoNCE between modality m's embedding and the caption's; media_text: InfoNCE between the fused
// embedding of all media of a sample (the fusion strategy's output without the text) and the caption's; lm: causal
// language modelling of the captions.
struct ObjectivesConfig {
  double video_text = 1.0;
  double audio_text = 1.0;
  double image_text = 1.0;
  double media_text = 1.0;
  double lm = 0.0;
  double temperature = 0.07;           // initial InfoNCE temperature
  bool learn_temperature = true;       // learned as log(1/temperature), clamped to at most 100 as in CLIP
  bool operator==(const ObjectivesConfig&) const = default;
};

// [ablate]: `longnet ablate CONFIG` trains one run per (strategy, missing rate, seed) and tabulates the evaluation.
struct AblateConfig {
  std::vector<std::string> strategies{"concat_seq", "late"};
  std::vector<double> missing_rates{0.0};
  std::vector<int64_t> seeds{0};
  bool operator==(const AblateConfig&) const = default;
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
  bool skip_nonfinite = false;         // a step with a non-finite loss or gradient norm is skipped, not fatal
  bool skip_oom = false;               // a step that runs out of GPU memory is skipped, not fatal (one process only)
  int64_t max_skipped_steps = 10;      // consecutive skipped steps before the run stops anyway
  int64_t profile_from = 0;            // 1-based step where a profile starts (pipelines/training.h); 0: none
  int64_t profile_steps = 3;
  // lm runs launched on several ranks: ranks that split each sample's sequence (LongNet sequence parallelism,
  // distributed/sequence_parallel.h); the world divides into world/sequence_parallel data-parallel groups.
  int64_t sequence_parallel = 1;
};

struct EvalConfig {
  int64_t every = 50;                  // steps between evaluations; 0: only at the end
  int64_t batches = 8;                 // lm: validation batches; multimodal: 0 evaluates the whole split
  std::string split = "val";           // multimodal: the held-out split retrieval runs on ("val" | "test")
  // multimodal zero-shot classification: the manifest's `label` (an index into these classes, or a class name) is
  // predicted by the nearest class embedding, each class embedded as the mean of its prompts (every template with
  // "{}" replaced by the class name). `longnet prepare` tokenises the prompts into the shard folder.
  std::vector<std::string> zero_shot_classes;
  std::vector<std::string> zero_shot_templates{"{}"};
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
  PrepareConfig prepare;
  ObjectivesConfig objectives;
  AblateConfig ablate;
};

ExperimentConfig load_experiment(const std::filesystem::path& file, const std::vector<std::string>& overrides = {});
// Same, from text (no `base` inheritance); `source_name` appears in error messages.
ExperimentConfig parse_experiment(const std::string& text, const std::string& source_name,
                                  const std::vector<std::string>& overrides = {});

// The resolved config as TOML; parse_experiment(to_toml(c)) gives back c.
std::string to_toml(const ExperimentConfig& config);

}  // namespace longnet::pipelines
