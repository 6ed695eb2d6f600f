#include "pipelines/experiment_config.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <sstream>

#include "core/config_reader.h"
#include "core/error.h"
#include "fusion/strategies.h"

namespace longnet::pipelines {
namespace {

using config::Section;

std::string fmt_number(double x) {
  std::ostringstream ss;
  ss << x;
  return ss.str();
}

using config::at_least;

void in_unit_interval(const Section& s, std::string_view key, double value, bool include_zero, bool include_one) {
  const bool ok = (include_zero ? value >= 0 : value > 0) && (include_one ? value <= 1 : value < 1);
  if (!ok || std::isnan(value)) {
    s.fail(key, std::string("must be in ") + (include_zero ? "[0, " : "(0, ") + (include_one ? "1]" : "1)") +
                    ", got " + fmt_number(value));
  }
}

RunConfig parse_run(const Section& s) {
  RunConfig c;
  c.name = s.string("name", c.name);
  // The run folder is <output_dir>/<name>: a name must not climb out of it or nest.
  if (c.name.empty() || c.name == "." || c.name == ".." || c.name.find_first_of("/\\") != std::string::npos) {
    s.fail("name", "must be a folder name (not empty, '.' or '..', no '/' or '\\'), got \"" + c.name + "\"");
  }
  c.task = s.choice("task", c.task, {"lm", "multimodal"});
  c.seed = s.integer("seed", c.seed);
  at_least(s, "seed", c.seed, 0);
  c.device = s.choice("device", c.device, {"auto", "cpu", "cuda"});
  c.output_dir = s.string("output_dir", c.output_dir);
  if (c.output_dir.empty()) s.fail("output_dir", "must be a folder path, got an empty string");
  s.finish();
  return c;
}

fusion::ModelConfig parse_model(const Section& s) {
  fusion::ModelConfig c;
  c.width = s.integer("width", c.width);
  at_least(s, "width", c.width, 1);
  c.depth = s.integer("depth", c.depth);
  at_least(s, "depth", c.depth, 1);
  c.heads = s.integer("heads", c.heads);
  at_least(s, "heads", c.heads, 1);
  c.kv_heads = s.integer("kv_heads", c.heads);
  at_least(s, "kv_heads", c.kv_heads, 1);
  if (c.width % c.heads != 0) {
    s.fail("heads", "must divide model.width (" + std::to_string(c.width) + "), got " + std::to_string(c.heads));
  }
  if (c.heads % c.kv_heads != 0) {
    s.fail("kv_heads", "must divide model.heads (" + std::to_string(c.heads) + "), got " + std::to_string(c.kv_heads));
  }
  const std::vector<std::string> mlp_kinds(fusion::kMlpKindNames.begin(), fusion::kMlpKindNames.end());
  const std::string mlp = s.choice("mlp", "gelu", mlp_kinds);
  c.mlp = static_cast<fusion::MlpKind>(std::find(mlp_kinds.begin(), mlp_kinds.end(), mlp) - mlp_kinds.begin());
  c.mlp_ratio = s.number("mlp_ratio", c.mlp_ratio);
  if (!(c.mlp_ratio > 0)) s.fail("mlp_ratio", "must be > 0, got " + fmt_number(c.mlp_ratio));
  c.dropout = s.number("dropout", c.dropout);
  in_unit_interval(s, "dropout", c.dropout, true, false);
  c.sub_layernorm = s.boolean("sub_layernorm", c.sub_layernorm);
  c.activation_checkpointing = s.boolean("activation_checkpointing", c.activation_checkpointing);
  c.autocast_residual = s.boolean("autocast_residual", c.autocast_residual);
  c.vocab_size = s.integer("vocab_size", c.vocab_size);
  at_least(s, "vocab_size", c.vocab_size, 2);
  c.max_length = s.integer("max_length", c.max_length);
  at_least(s, "max_length", c.max_length, 1);
  s.finish();
  return c;
}

fusion::AttentionConfig parse_attention(const Section& s) {
  fusion::AttentionConfig c;
  auto& d = c.dilated;
  config::read_dilated_pattern(s, d.segment_lengths, d.dilation_rates);
  d.causal = s.boolean("causal", d.causal);
  d.backend = attention::parse_backend(s.choice("backend", "auto", {"auto", "reference", "flash", "fused"}));
  d.mix = attention::parse_mix(s.choice("mix", "lse", {"lse", "head_split"}));
  c.position = attention::parse_position_encoding(
      s.choice("position", "rope", {"none", "rope", "xpos", "relative_bias"}));
  c.qk_layernorm = s.boolean("qk_layernorm", c.qk_layernorm);
  c.dropout = s.number("dropout", c.dropout);
  in_unit_interval(s, "dropout", c.dropout, true, false);
  c.bias = s.boolean("bias", c.bias);
  c.rope_theta = s.number("rope_theta", c.rope_theta);
  if (!(c.rope_theta > 0)) s.fail("rope_theta", "must be > 0, got " + fmt_number(c.rope_theta));
  c.xpos_scale_base = s.number("xpos_scale_base", c.xpos_scale_base);
  if (!(c.xpos_scale_base > 0)) s.fail("xpos_scale_base", "must be > 0, got " + fmt_number(c.xpos_scale_base));
  c.relative_num_buckets = s.integer("relative_num_buckets", c.relative_num_buckets);
  at_least(s, "relative_num_buckets", c.relative_num_buckets, 2);
  c.relative_max_distance = s.integer("relative_max_distance", c.relative_max_distance);
  at_least(s, "relative_max_distance", c.relative_max_distance, 1);
  if (c.position == attention::PositionEncoding::relative_bias) {
    // T5 bucketing: half the buckets (per direction when not causal) are exact distances, the rest logarithmic.
    const bool bidirectional = !d.causal;
    if (bidirectional) at_least(s, "relative_num_buckets", c.relative_num_buckets, 4);
    const int64_t exact = (bidirectional ? c.relative_num_buckets / 2 : c.relative_num_buckets) / 2;
    if (c.relative_max_distance <= exact) {
      s.fail("relative_max_distance", "must exceed the " + std::to_string(exact) +
                                          " exactly bucketed distances of attention.relative_num_buckets = " +
                                          std::to_string(c.relative_num_buckets) + ", got " +
                                          std::to_string(c.relative_max_distance));
    }
  }
  s.finish();
  d.validate();
  return c;
}

DataConfig parse_data(const Section& s) {
  DataConfig c;
  c.corpus = s.string_list("corpus", c.corpus);
  for (size_t i = 0; i < c.corpus.size(); ++i) {
    if (c.corpus[i].empty()) s.fail_element("corpus", i, "must be a file path, got an empty string");
  }
  c.sequence_length = s.integer("sequence_length", c.sequence_length);
  at_least(s, "sequence_length", c.sequence_length, 2);
  c.validation_fraction = s.number("validation_fraction", c.validation_fraction);
  if (!(c.validation_fraction > 0 && c.validation_fraction <= 0.5)) {
    s.fail("validation_fraction", "must be in (0, 0.5], got " + fmt_number(c.validation_fraction));
  }
  c.manifest = s.string("manifest", c.manifest);
  c.shards = s.string("shards", c.shards);
  c.tokenizer = s.string("tokenizer", c.tokenizer);
  c.loader_workers = s.integer("loader_workers", c.loader_workers);
  at_least(s, "loader_workers", c.loader_workers, 1);
  c.prefetch = s.integer("prefetch", c.prefetch);
  at_least(s, "prefetch", c.prefetch, 1);
  c.bucket_batches = s.integer("bucket_batches", c.bucket_batches);
  at_least(s, "bucket_batches", c.bucket_batches, 0);
  c.missing_rate = s.number("missing_rate", c.missing_rate);
  in_unit_interval(s, "missing_rate", c.missing_rate, true, false);
  c.max_bad_fraction = s.number("max_bad_fraction", c.max_bad_fraction);
  in_unit_interval(s, "max_bad_fraction", c.max_bad_fraction, true, true);
  c.epoch_samples = s.integer("epoch_samples", c.epoch_samples);
  at_least(s, "epoch_samples", c.epoch_samples, 0);
  const std::vector<Section> sources = s.table_list("sources");
  if (!sources.empty() && (!c.manifest.empty() || !c.shards.empty())) {
    s.fail(!c.manifest.empty() ? "manifest" : "shards",
           "cannot be set together with data.sources (the first source is the evaluation dataset; set it to \"\" "
           "where a base config gives it)");
  }
  for (const Section& entry : sources) {
    DataSource source;
    source.manifest = entry.string("manifest", source.manifest);
    source.shards = entry.string("shards");
    if (source.shards.empty()) entry.fail("shards", "must name the folder of prepared shards");
    source.weight = entry.number("weight", source.weight);
    if (!(source.weight > 0)) entry.fail("weight", "must be > 0, got " + fmt_number(source.weight));
    entry.finish();
    c.sources.push_back(source);
  }
  if (!c.sources.empty()) {
    c.manifest = c.sources.front().manifest;
    c.shards = c.sources.front().shards;
  }
  s.finish();
  return c;
}

}  // namespace

std::vector<DataSource> training_sources(const DataConfig& data) {
  if (!data.sources.empty()) return data.sources;
  return {DataSource{.manifest = data.manifest, .shards = data.shards, .weight = 1.0}};
}

namespace {

PrepareConfig parse_prepare(const Section& s) {
  PrepareConfig c;
  c.workers = s.integer("workers", c.workers);
  at_least(s, "workers", c.workers, 0);
  c.on_bad = s.choice("on_bad", c.on_bad, {"skip", "fail"});
  c.text_max_tokens = s.integer("text_max_tokens", c.text_max_tokens);
  at_least(s, "text_max_tokens", c.text_max_tokens, 2);
  c.tokenizer_vocab_size = s.integer("tokenizer_vocab_size", c.tokenizer_vocab_size);
  at_least(s, "tokenizer_vocab_size", c.tokenizer_vocab_size, 16);
  for (auto [key, value] : {std::pair{"image_size", &c.image_size}, {"image_patch", &c.image_patch},
                            {"video_size", &c.video_size}, {"video_frames", &c.video_frames},
                            {"video_patch", &c.video_patch}, {"video_tubelet", &c.video_tubelet},
                            {"mel_bins", &c.mel_bins}, {"mel_frames_per_patch", &c.mel_frames_per_patch},
                            {"max_shard_mb", &c.max_shard_mb}}) {
    *value = s.integer(key, *value);
    at_least(s, key, *value, 1);
  }
  if (c.image_size % c.image_patch != 0) {
    s.fail("image_patch", "must divide prepare.image_size (" + std::to_string(c.image_size) + "), got " +
                              std::to_string(c.image_patch));
  }
  if (c.video_size % c.video_patch != 0) {
    s.fail("video_patch", "must divide prepare.video_size (" + std::to_string(c.video_size) + "), got " +
                              std::to_string(c.video_patch));
  }
  c.video_fps = s.number("video_fps", c.video_fps);
  if (!(c.video_fps >= 0)) s.fail("video_fps", "must be >= 0 (0: prepare.video_frames uniformly), got " +
                                               fmt_number(c.video_fps));
  c.video_clip_seconds = s.number("video_clip_seconds", c.video_clip_seconds);
  if (!(c.video_clip_seconds >= 0)) {
    s.fail("video_clip_seconds", "must be >= 0 (0: the whole video), got " + fmt_number(c.video_clip_seconds));
  }
  c.eval_clips = s.integer("eval_clips", c.eval_clips);
  at_least(s, "eval_clips", c.eval_clips, 1);
  c.train_clips = s.integer("train_clips", c.train_clips);
  at_least(s, "train_clips", c.train_clips, 1);
  c.audio_max_seconds = s.number("audio_max_seconds", c.audio_max_seconds);
  if (!(c.audio_max_seconds > 0)) s.fail("audio_max_seconds", "must be > 0, got " + fmt_number(c.audio_max_seconds));
  c.audio_seconds = s.number("audio_seconds", c.audio_seconds);
  if (!(c.audio_seconds >= 0 && c.audio_seconds <= c.audio_max_seconds)) {
    s.fail("audio_seconds", "must be in [0, prepare.audio_max_seconds = " + fmt_number(c.audio_max_seconds) +
                                "] (0: clips keep their length), got " + fmt_number(c.audio_seconds));
  }
  c.audio_fit = s.choice("audio_fit", c.audio_fit, {"pad", "loop", "crop"});
  s.finish();
  return c;
}

ObjectivesConfig parse_objectives(const Section& s) {
  ObjectivesConfig c;
  for (auto [key, value] : {std::pair{"video_text", &c.video_text}, {"audio_text", &c.audio_text},
                            {"image_text", &c.image_text}, {"media_text", &c.media_text}, {"lm", &c.lm}}) {
    *value = s.number(key, *value);
    if (!(*value >= 0)) s.fail(key, "must be >= 0 (0 turns the loss off), got " + fmt_number(*value));
  }
  c.temperature = s.number("temperature", c.temperature);
  if (!(c.temperature > 0.01 && c.temperature <= 10)) {
    s.fail("temperature", "must be in (0.01, 10], got " + fmt_number(c.temperature));
  }
  c.learn_temperature = s.boolean("learn_temperature", c.learn_temperature);
  s.finish();
  return c;
}

AblateConfig parse_ablate(const Section& s) {
  AblateConfig c;
  c.strategies = s.string_list("strategies", c.strategies);
  if (c.strategies.empty()) s.fail("strategies", "must list at least one fusion strategy");
  const auto known = fusion::registered_strategies();
  for (size_t i = 0; i < c.strategies.size(); ++i) {
    if (std::find(known.begin(), known.end(), c.strategies[i]) == known.end()) {
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      s.fail_element("strategies", i, "unknown fusion strategy \"" + c.strategies[i] + "\" (known: " + list + ")");
    }
  }
  c.missing_rates = s.number_list("missing_rates", c.missing_rates);
  if (c.missing_rates.empty()) s.fail("missing_rates", "must list at least one rate");
  for (size_t i = 0; i < c.missing_rates.size(); ++i) {
    if (!(c.missing_rates[i] >= 0 && c.missing_rates[i] < 1)) {
      s.fail_element("missing_rates", i, "must be in [0, 1), got " + fmt_number(c.missing_rates[i]));
    }
  }
  c.seeds = s.integer_list("seeds", c.seeds);
  if (c.seeds.empty()) s.fail("seeds", "must list at least one seed");
  for (size_t i = 0; i < c.seeds.size(); ++i) {
    if (c.seeds[i] < 0) s.fail_element("seeds", i, "must be >= 0, got " + std::to_string(c.seeds[i]));
  }
  s.finish();
  return c;
}

TrainConfig parse_train(const Section& s) {
  TrainConfig c;
  c.steps = s.integer("steps", c.steps);
  at_least(s, "steps", c.steps, 1);
  c.batch_size = s.integer("batch_size", c.batch_size);
  at_least(s, "batch_size", c.batch_size, 1);
  c.grad_accumulation = s.integer("grad_accumulation", c.grad_accumulation);
  at_least(s, "grad_accumulation", c.grad_accumulation, 1);
  c.sequence_parallel = s.integer("sequence_parallel", c.sequence_parallel);
  at_least(s, "sequence_parallel", c.sequence_parallel, 1);
  c.lr = s.number("lr", c.lr);
  if (!(c.lr > 0)) s.fail("lr", "must be > 0, got " + fmt_number(c.lr));
  c.min_lr_ratio = s.number("min_lr_ratio", c.min_lr_ratio);
  in_unit_interval(s, "min_lr_ratio", c.min_lr_ratio, true, true);
  c.warmup_steps = s.integer("warmup_steps", c.warmup_steps);
  at_least(s, "warmup_steps", c.warmup_steps, 0);
  if (c.warmup_steps > c.steps) {
    s.fail("warmup_steps", "must not exceed train.steps (" + std::to_string(c.steps) + "), got " +
                               std::to_string(c.warmup_steps));
  }
  c.weight_decay = s.number("weight_decay", c.weight_decay);
  if (!(c.weight_decay >= 0)) s.fail("weight_decay", "must be >= 0, got " + fmt_number(c.weight_decay));
  c.beta1 = s.number("beta1", c.beta1);
  in_unit_interval(s, "beta1", c.beta1, true, false);
  c.beta2 = s.number("beta2", c.beta2);
  in_unit_interval(s, "beta2", c.beta2, true, false);
  c.grad_clip = s.number("grad_clip", c.grad_clip);
  if (!(c.grad_clip >= 0)) s.fail("grad_clip", "must be >= 0 (0 disables clipping), got " + fmt_number(c.grad_clip));
  c.precision = s.choice("precision", c.precision, {"fp32", "bf16"});
  c.log_every = s.integer("log_every", c.log_every);
  at_least(s, "log_every", c.log_every, 1);
  c.checkpoint_every = s.integer("checkpoint_every", c.checkpoint_every);
  at_least(s, "checkpoint_every", c.checkpoint_every, 0);
  c.keep_checkpoints = s.integer("keep_checkpoints", c.keep_checkpoints);
  at_least(s, "keep_checkpoints", c.keep_checkpoints, 1);
  c.skip_nonfinite = s.boolean("skip_nonfinite", c.skip_nonfinite);
  c.skip_oom = s.boolean("skip_oom", c.skip_oom);
  c.max_skipped_steps = s.integer("max_skipped_steps", c.max_skipped_steps);
  at_least(s, "max_skipped_steps", c.max_skipped_steps, 1);
  c.profile_from = s.integer("profile_from", c.profile_from);
  at_least(s, "profile_from", c.profile_from, 0);
  c.profile_steps = s.integer("profile_steps", c.profile_steps);
  at_least(s, "profile_steps", c.profile_steps, 1);
  s.finish();
  return c;
}

EvalConfig parse_eval(const Section& s) {
  EvalConfig c;
  c.every = s.integer("every", c.every);
  at_least(s, "every", c.every, 0);
  c.batches = s.integer("batches", c.batches);
  at_least(s, "batches", c.batches, 0);
  c.split = s.choice("split", c.split, {"val", "test"});
  c.zero_shot_classes = s.string_list("zero_shot_classes", c.zero_shot_classes);
  for (size_t i = 0; i < c.zero_shot_classes.size(); ++i) {
    if (c.zero_shot_classes[i].empty()) s.fail_element("zero_shot_classes", i, "must not be empty");
    for (size_t j = 0; j < i; ++j) {
      if (c.zero_shot_classes[j] == c.zero_shot_classes[i]) {
        s.fail_element("zero_shot_classes", i, "repeats \"" + c.zero_shot_classes[i] + "\"");
      }
    }
  }
  if (c.zero_shot_classes.size() == 1) s.fail("zero_shot_classes", "needs at least two classes (or none)");
  c.zero_shot_templates = s.string_list("zero_shot_templates", c.zero_shot_templates);
  if (c.zero_shot_templates.empty()) s.fail("zero_shot_templates", "must list at least one template");
  for (size_t i = 0; i < c.zero_shot_templates.size(); ++i) {
    const auto& t = c.zero_shot_templates[i];
    if (t.find("{}") == std::string::npos || t.find("{}") != t.rfind("{}")) {
      s.fail_element("zero_shot_templates", i, "must contain \"{}\" exactly once (where the class name goes), got \"" +
                                                   t + "\"");
    }
  }
  s.finish();
  return c;
}

// Relations between the multimodal tables: patch sizes that match the model, a loss to train.
void check_multimodal(const ExperimentConfig& c, const Section& root) {
  using modalities::Modality;
  const Section mods = root.section("modalities");
  auto check_dim = [&](Modality m, int64_t prepared, const std::string& from) {
    const auto& mc = c.multimodal[m];
    if (mc.enabled && mc.input_dim != prepared) {
      mods.section(modalities::to_string(m))
          .fail("patch_dim", "must be " + std::to_string(prepared) + ", the values per patch that " + from +
                                 " give, got " + std::to_string(mc.input_dim));
    }
  };
  const auto& p = c.prepare;
  check_dim(Modality::image, p.image_patch_dim(), "prepare.image_patch = " + std::to_string(p.image_patch));
  check_dim(Modality::video, p.video_patch_dim(),
            "prepare.video_patch = " + std::to_string(p.video_patch) + " and video_tubelet = " +
                std::to_string(p.video_tubelet));
  check_dim(Modality::audio, p.audio_patch_dim(),
            "prepare.mel_bins = " + std::to_string(p.mel_bins) + " and mel_frames_per_patch = " +
                std::to_string(p.mel_frames_per_patch));
  const auto& text = c.multimodal[Modality::text];
  if (text.enabled && text.input_dim < p.tokenizer_vocab_size) {
    mods.section("text").fail("vocab_size", "must be at least prepare.tokenizer_vocab_size (" +
                                                std::to_string(p.tokenizer_vocab_size) + "), got " +
                                                std::to_string(text.input_dim));
  }
  // At least one loss that the enabled modalities can compute.
  const auto& o = c.objectives;
  const bool has_text = text.enabled;
  const bool any_media = c.multimodal[Modality::image].enabled || c.multimodal[Modality::video].enabled ||
                         c.multimodal[Modality::audio].enabled;
  const double usable = (has_text ? o.lm : 0.0) +
                        (has_text && c.multimodal[Modality::video].enabled ? o.video_text : 0.0) +
                        (has_text && c.multimodal[Modality::audio].enabled ? o.audio_text : 0.0) +
                        (has_text && c.multimodal[Modality::image].enabled ? o.image_text : 0.0) +
                        (has_text && any_media ? o.media_text : 0.0);
  if (!(usable > 0)) {
    root.section("objectives").fail("media_text", "no objective has a positive weight with the enabled modalities "
                                                  "(the contrastive losses pair a medium with text; lm needs text)");
  }
}

ExperimentConfig parse(const config::Document& doc) {
  ExperimentConfig c;
  c.source = doc.file();
  const Section root = doc.root();
  c.run = parse_run(root.section("run"));
  c.model = parse_model(root.section("model"));
  c.attention = parse_attention(root.section("attention"));
  c.data = parse_data(root.section("data"));
  c.train = parse_train(root.section("train"));
  c.eval = parse_eval(root.section("eval"));
  c.multimodal = fusion::parse_multimodal(root.section("fusion"), root.section("modalities"));
  c.prepare = parse_prepare(root.section("prepare"));
  c.objectives = parse_objectives(root.section("objectives"));
  c.ablate = parse_ablate(root.section("ablate"));
  root.finish();

  // Relations across tables.
  if (c.data.sequence_length > c.model.max_length) {
    // Blame the key the file sets: a default sequence length has no line to point at.
    if (const Section data = root.section("data"); data.has("sequence_length")) {
      data.fail("sequence_length", "must not exceed model.max_length (" + std::to_string(c.model.max_length) +
                                       "), got " + std::to_string(c.data.sequence_length));
    }
    root.section("model").fail("max_length", "must be at least data.sequence_length (" +
                                                 std::to_string(c.data.sequence_length) + ", the default), got " +
                                                 std::to_string(c.model.max_length));
  }
  if (c.run.task == "lm" && c.data.corpus.empty()) {
    root.section("data").fail("corpus", "must list at least one text file for run.task = \"lm\"");
  }
  if (c.run.task == "lm" && !c.attention.dilated.causal) {
    root.section("attention").fail("causal", "must be true for run.task = \"lm\" (a language model may not see the "
                                             "tokens it predicts)");
  }
  const bool rotary = c.attention.position == attention::PositionEncoding::rope ||
                      c.attention.position == attention::PositionEncoding::xpos;
  if (rotary && (c.model.width / c.model.heads) % 2 != 0) {
    // Rotary encodings turn pairs of channels of every head.
    root.section("attention").fail("position", "\"" + attention::to_string(c.attention.position) +
                                                   "\" needs an even head dimension, and model.width / model.heads = " +
                                                   std::to_string(c.model.width / c.model.heads));
  }
  if (c.attention.position == attention::PositionEncoding::relative_bias &&
      (c.attention.dilated.backend == attention::Backend::flash ||
       c.attention.dilated.backend == attention::Backend::fused)) {
    root.section("attention").fail("position", "\"relative_bias\" is supported by the reference backend only, and "
                                               "attention.backend is \"" +
                                                   attention::to_string(c.attention.dilated.backend) + "\"");
  }
  if (c.run.task == "multimodal" && !c.multimodal.any_enabled()) {
    root.section("run").fail("task", "\"multimodal\" needs at least one enabled modality ([modalities.text|image|"
                                     "video|audio] with enabled = true)");
  }
  if (c.train.sequence_parallel > 1) {
    const Section train = root.section("train");
    if (c.run.task != "lm") train.fail("sequence_parallel", "splits sequences of run.task = \"lm\" only");
    if (c.attention.dilated.mix != attention::Mix::lse) {
      train.fail("sequence_parallel", "needs attention.mix = \"lse\"");
    }
    if (c.attention.position == attention::PositionEncoding::relative_bias) {
      train.fail("sequence_parallel", "does not support attention.position = \"relative_bias\"");
    }
    if (c.data.sequence_length < c.train.sequence_parallel) {
      train.fail("sequence_parallel", "must not exceed data.sequence_length (" +
                                          std::to_string(c.data.sequence_length) + "), got " +
                                          std::to_string(c.train.sequence_parallel));
    }
  }
  if (c.run.task == "lm" && c.eval.batches == 0) {
    root.section("eval").fail("batches", "must be >= 1 for run.task = \"lm\" (0, the whole split, is for "
                                         "\"multimodal\")");
  }
  if (c.attention.dilated.mix == attention::Mix::head_split) {
    // The per-modality stacks and the cross-modality layers use their own patterns with the same heads.
    auto check_branches = [&](const Section& s, size_t branches) {
      if (c.model.heads < static_cast<int64_t>(branches)) {
        s.fail("segment_lengths", "has " + std::to_string(branches) + " branches, more than model.heads = " +
                                      std::to_string(c.model.heads) + " (attention.mix = \"head_split\" needs a head "
                                      "per branch)");
      }
    };
    if (c.multimodal.any_enabled()) check_branches(root.section("fusion"), c.multimodal.fusion.segment_lengths.size());
    for (auto m : modalities::kAllModalities) {
      if (c.multimodal[m].enabled) {
        check_branches(root.section("modalities").section(modalities::to_string(m)),
                       c.multimodal[m].segment_lengths.size());
      }
    }
    // head_split gives every branch its own group of at least one head.
    const auto branches = static_cast<int64_t>(c.attention.dilated.segment_lengths.size());
    if (c.model.heads < branches) {
      root.section("attention").fail("mix", "\"head_split\" needs at least one head per branch, and model.heads = " +
                                                std::to_string(c.model.heads) + " is less than the " +
                                                std::to_string(branches) + " branches");
    }
  }
  if (c.run.task == "multimodal") check_multimodal(c, root);
  return c;
}

}  // namespace

ExperimentConfig load_experiment(const std::filesystem::path& file, const std::vector<std::string>& overrides) {
  return parse(config::Document::load(file, overrides));
}

ExperimentConfig parse_experiment(const std::string& text, const std::string& source_name,
                                  const std::vector<std::string>& overrides) {
  return parse(config::Document::parse(text, source_name, overrides));
}

namespace {

// Writes the resolved config in the schema's order (run, model, attention, data, train, eval; keys as the structs
// declare them) with floats in their shortest exact form: "0.1", not the "0.10000000000000001" of toml++'s printer.
class TomlWriter {
 public:
  void table(const char* name) { out_ << (out_.tellp() > 0 ? "\n[" : "[") << name << "]\n"; }
  void put(const char* key, int64_t v) { line(key, std::to_string(v)); }
  void put(const char* key, bool v) { line(key, v ? "true" : "false"); }
  void put(const char* key, double v) { line(key, number(v)); }
  void put(const char* key, const std::string& v) { line(key, quote(v)); }
  void put(const char* key, const char* v) { line(key, quote(v)); }
  void put(const char* key, const std::vector<int64_t>& v) {
    std::string text;
    for (int64_t x : v) text += (text.empty() ? "" : ", ") + std::to_string(x);
    line(key, "[" + text + "]");
  }
  void put(const char* key, const std::vector<double>& v) {
    std::string text;
    for (double x : v) text += (text.empty() ? "" : ", ") + number(x);
    line(key, "[" + text + "]");
  }
  void put(const char* key, const std::vector<std::string>& v) {  // one entry a line: these are file paths
    std::string text;
    for (const auto& x : v) text += (v.size() > 1 ? "\n  " : "") + quote(x) + (v.size() > 1 ? "," : "");
    line(key, "[" + text + (v.size() > 1 ? "\n]" : "]"));
  }
  void put(const char* key, const std::vector<DataSource>& v) {  // inline tables, one a line
    std::string text;
    for (const auto& x : v) {
      text += "\n  {manifest = " + quote(x.manifest) + ", shards = " + quote(x.shards) + ", weight = " + number(x.weight) +
              "},";
    }
    line(key, "[" + text + "\n]");
  }
  std::string str() const { return out_.str(); }

 private:
  static std::string number(double v) {
    char buf[64];
    std::string text(buf, std::to_chars(buf, buf + sizeof buf, v).ptr);  // shortest text that reads back as v
    if (text.find_first_of(".en") == std::string::npos) text += ".0";  // keep it a TOML float
    return text;
  }
  void line(const char* key, const std::string& value) { out_ << key << " = " << value << "\n"; }
  static std::string quote(const std::string& s) {  // toml++ picks the quoting and escapes
    std::ostringstream ss;
    ss << toml::toml_formatter(toml::value<std::string>(s));
    return ss.str();
  }
  std::ostringstream out_;
};

}  // namespace

std::string to_toml(const ExperimentConfig& c) {
  TomlWriter w;
  w.table("run");
  w.put("name", c.run.name);
  w.put("task", c.run.task);
  w.put("seed", c.run.seed);
  w.put("device", c.run.device);
  w.put("output_dir", c.run.output_dir);

  const auto& m = c.model;
  w.table("model");
  w.put("width", m.width);
  w.put("depth", m.depth);
  w.put("heads", m.heads);
  w.put("kv_heads", m.kv_heads);
  w.put("mlp", fusion::to_string(m.mlp));
  w.put("mlp_ratio", m.mlp_ratio);
  w.put("dropout", m.dropout);
  w.put("sub_layernorm", m.sub_layernorm);
  w.put("activation_checkpointing", m.activation_checkpointing);
  w.put("autocast_residual", m.autocast_residual);
  w.put("vocab_size", m.vocab_size);
  w.put("max_length", m.max_length);

  const auto& a = c.attention;
  w.table("attention");
  w.put("segment_lengths", a.dilated.segment_lengths);
  w.put("dilation_rates", a.dilated.dilation_rates);
  w.put("causal", a.dilated.causal);
  w.put("backend", attention::to_string(a.dilated.backend));
  w.put("mix", attention::to_string(a.dilated.mix));
  w.put("position", attention::to_string(a.position));
  w.put("qk_layernorm", a.qk_layernorm);
  w.put("dropout", a.dropout);
  w.put("bias", a.bias);
  w.put("rope_theta", a.rope_theta);
  w.put("xpos_scale_base", a.xpos_scale_base);
  w.put("relative_num_buckets", a.relative_num_buckets);
  w.put("relative_max_distance", a.relative_max_distance);

  w.table("data");
  w.put("corpus", c.data.corpus);
  w.put("sequence_length", c.data.sequence_length);
  w.put("validation_fraction", c.data.validation_fraction);
  const DataConfig data_defaults;
  const bool multimodal = c.run.task == "multimodal";
  if (multimodal || c.data.manifest != data_defaults.manifest || c.data.shards != data_defaults.shards ||
      c.data.tokenizer != data_defaults.tokenizer || c.data.loader_workers != data_defaults.loader_workers ||
      c.data.prefetch != data_defaults.prefetch || c.data.bucket_batches != data_defaults.bucket_batches ||
      c.data.missing_rate != data_defaults.missing_rate || c.data.max_bad_fraction != data_defaults.max_bad_fraction ||
      !c.data.sources.empty() || c.data.epoch_samples != data_defaults.epoch_samples) {
    if (c.data.sources.empty()) {
      w.put("manifest", c.data.manifest);
      w.put("shards", c.data.shards);
    } else {
      w.put("sources", c.data.sources);
    }
    w.put("tokenizer", c.data.tokenizer);
    w.put("loader_workers", c.data.loader_workers);
    w.put("prefetch", c.data.prefetch);
    w.put("bucket_batches", c.data.bucket_batches);
    w.put("missing_rate", c.data.missing_rate);
    w.put("max_bad_fraction", c.data.max_bad_fraction);
    w.put("epoch_samples", c.data.epoch_samples);
  }

  const auto& t = c.train;
  w.table("train");
  w.put("steps", t.steps);
  w.put("batch_size", t.batch_size);
  w.put("grad_accumulation", t.grad_accumulation);
  if (t.sequence_parallel != 1) w.put("sequence_parallel", t.sequence_parallel);
  w.put("lr", t.lr);
  w.put("min_lr_ratio", t.min_lr_ratio);
  w.put("warmup_steps", t.warmup_steps);
  w.put("weight_decay", t.weight_decay);
  w.put("beta1", t.beta1);
  w.put("beta2", t.beta2);
  w.put("grad_clip", t.grad_clip);
  w.put("precision", t.precision);
  w.put("log_every", t.log_every);
  w.put("checkpoint_every", t.checkpoint_every);
  w.put("keep_checkpoints", t.keep_checkpoints);
  if (t.skip_nonfinite || t.skip_oom || t.max_skipped_steps != TrainConfig{}.max_skipped_steps) {
    w.put("skip_nonfinite", t.skip_nonfinite);
    w.put("skip_oom", t.skip_oom);
    w.put("max_skipped_steps", t.max_skipped_steps);
  }
  if (t.profile_from > 0 || t.profile_steps != TrainConfig{}.profile_steps) {
    w.put("profile_from", t.profile_from);
    w.put("profile_steps", t.profile_steps);
  }

  w.table("eval");
  w.put("every", c.eval.every);
  w.put("batches", c.eval.batches);
  w.put("split", c.eval.split);
  if (!c.eval.zero_shot_classes.empty() || c.eval.zero_shot_templates != EvalConfig{}.zero_shot_templates) {
    w.put("zero_shot_classes", c.eval.zero_shot_classes);
    w.put("zero_shot_templates", c.eval.zero_shot_templates);
  }

  // The multimodal tables only when they say something: a text LM config prints as it always did.
  const auto& mm = c.multimodal;
  if (mm.any_enabled() || mm.fusion != fusion::FusionConfig{}) {
    const auto& f = mm.fusion;
    w.table("fusion");
    w.put("strategy", f.strategy);
    w.put("depth", f.depth);
    w.put("segment_lengths", f.segment_lengths);
    w.put("dilation_rates", f.dilation_rates);
    w.put("bottleneck_tokens", f.bottleneck_tokens);
    w.put("pooled_length", f.pooled_length);
    w.put("embed_dim", f.embed_dim);
    w.put("parallel_stacks", f.parallel_stacks);
    w.put("batch_invariant", f.batch_invariant);
  }
  for (auto mod : modalities::kAllModalities) {
    const auto& mc = mm[mod];
    if (mc == fusion::default_modality_config(mod)) continue;
    const std::string table = "modalities." + modalities::to_string(mod);
    w.table(table.c_str());
    w.put("enabled", mc.enabled);
    w.put("depth", mc.depth);
    w.put("segment_lengths", mc.segment_lengths);
    w.put("dilation_rates", mc.dilation_rates);
    if (mod == modalities::Modality::text) {
      w.put("vocab_size", mc.input_dim);
    } else if (mc.input_dim > 0) {
      w.put("patch_dim", mc.input_dim);
    }
    w.put("positional", modalities::to_string(mc.positional));
    w.put("max_positions", mc.max_positions);
  }
  if (multimodal || c.prepare != PrepareConfig{}) {
    const auto& p = c.prepare;
    w.table("prepare");
    w.put("workers", p.workers);
    w.put("on_bad", p.on_bad);
    w.put("text_max_tokens", p.text_max_tokens);
    w.put("tokenizer_vocab_size", p.tokenizer_vocab_size);
    w.put("image_size", p.image_size);
    w.put("image_patch", p.image_patch);
    w.put("video_size", p.video_size);
    w.put("video_frames", p.video_frames);
    w.put("video_fps", p.video_fps);
    w.put("video_clip_seconds", p.video_clip_seconds);
    w.put("eval_clips", p.eval_clips);
    w.put("train_clips", p.train_clips);
    w.put("video_patch", p.video_patch);
    w.put("video_tubelet", p.video_tubelet);
    w.put("audio_max_seconds", p.audio_max_seconds);
    w.put("audio_seconds", p.audio_seconds);
    w.put("audio_fit", p.audio_fit);
    w.put("mel_bins", p.mel_bins);
    w.put("mel_frames_per_patch", p.mel_frames_per_patch);
    w.put("max_shard_mb", p.max_shard_mb);
  }
  if (multimodal || c.objectives != ObjectivesConfig{}) {
    const auto& o = c.objectives;
    w.table("objectives");
    w.put("video_text", o.video_text);
    w.put("audio_text", o.audio_text);
    w.put("image_text", o.image_text);
    w.put("media_text", o.media_text);
    w.put("lm", o.lm);
    w.put("temperature", o.temperature);
    w.put("learn_temperature", o.learn_temperature);
  }
  if (c.ablate != AblateConfig{}) {
    w.table("ablate");
    w.put("strategies", c.ablate.strategies);
    w.put("missing_rates", c.ablate.missing_rates);
    w.put("seeds", c.ablate.seeds);
  }
  return w.str();
}

}  // namespace longnet::pipelines
