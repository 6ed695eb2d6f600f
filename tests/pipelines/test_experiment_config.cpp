// Experiment configs: every bad config yields one exact message naming the place (file:line:col or the --set that
// caused it) and the dotted key; good configs fill defaults, apply overrides and inheritance, and round-trip through
// to_toml.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "pipelines/experiment_config.h"
#include "tests/support/temp_dir.h"

// After the torch headers (which experiment_config.h reaches): c10 defines its own CHECK, and the last definition wins.
#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using longnet::ConfigError;
using longnet::test::TempDir;
using longnet::pipelines::ExperimentConfig;
using longnet::pipelines::load_experiment;
using longnet::pipelines::parse_experiment;
using longnet::pipelines::to_toml;

namespace {

// The message of the ConfigError `f` throws, or a marker when it throws none. Any other exception escapes and fails
// the test with its own message.
template <typename F>
std::string config_error(F&& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "<no ConfigError>";
}


// The smallest config that passes: an LM needs a corpus and causal attention.
constexpr const char* kMinimal = R"([attention]
causal = true
[data]
corpus = ["corpus.txt"]
)";

void check_same(const ExperimentConfig& a, const ExperimentConfig& b) {
  CHECK(a.run.name == b.run.name);
  CHECK(a.run.task == b.run.task);
  CHECK(a.run.seed == b.run.seed);
  CHECK(a.run.device == b.run.device);
  CHECK(a.run.output_dir == b.run.output_dir);

  CHECK(a.model.width == b.model.width);
  CHECK(a.model.depth == b.model.depth);
  CHECK(a.model.heads == b.model.heads);
  CHECK(a.model.kv_heads == b.model.kv_heads);
  CHECK(a.model.mlp == b.model.mlp);
  CHECK(a.model.mlp_ratio == b.model.mlp_ratio);
  CHECK(a.model.activation_checkpointing == b.model.activation_checkpointing);
  CHECK(a.model.autocast_residual == b.model.autocast_residual);
  CHECK(a.model.dropout == b.model.dropout);
  CHECK(a.model.sub_layernorm == b.model.sub_layernorm);
  CHECK(a.model.vocab_size == b.model.vocab_size);
  CHECK(a.model.max_length == b.model.max_length);

  CHECK(a.attention.dilated.segment_lengths == b.attention.dilated.segment_lengths);
  CHECK(a.attention.dilated.dilation_rates == b.attention.dilated.dilation_rates);
  CHECK(a.attention.dilated.causal == b.attention.dilated.causal);
  CHECK(a.attention.dilated.backend == b.attention.dilated.backend);
  CHECK(a.attention.dilated.mix == b.attention.dilated.mix);
  CHECK(a.attention.position == b.attention.position);
  CHECK(a.attention.qk_layernorm == b.attention.qk_layernorm);
  CHECK(a.attention.dropout == b.attention.dropout);
  CHECK(a.attention.bias == b.attention.bias);
  CHECK(a.attention.rope_theta == b.attention.rope_theta);
  CHECK(a.attention.xpos_scale_base == b.attention.xpos_scale_base);
  CHECK(a.attention.relative_num_buckets == b.attention.relative_num_buckets);
  CHECK(a.attention.relative_max_distance == b.attention.relative_max_distance);

  CHECK(a.data.corpus == b.data.corpus);
  CHECK(a.data.sequence_length == b.data.sequence_length);
  CHECK(a.data.validation_fraction == b.data.validation_fraction);

  CHECK(a.train.steps == b.train.steps);
  CHECK(a.train.batch_size == b.train.batch_size);
  CHECK(a.train.grad_accumulation == b.train.grad_accumulation);
  CHECK(a.train.sequence_parallel == b.train.sequence_parallel);
  CHECK(a.train.lr == b.train.lr);
  CHECK(a.train.min_lr_ratio == b.train.min_lr_ratio);
  CHECK(a.train.warmup_steps == b.train.warmup_steps);
  CHECK(a.train.weight_decay == b.train.weight_decay);
  CHECK(a.train.beta1 == b.train.beta1);
  CHECK(a.train.beta2 == b.train.beta2);
  CHECK(a.train.grad_clip == b.train.grad_clip);
  CHECK(a.train.precision == b.train.precision);
  CHECK(a.train.log_every == b.train.log_every);
  CHECK(a.train.checkpoint_every == b.train.checkpoint_every);
  CHECK(a.train.keep_checkpoints == b.train.keep_checkpoints);
  CHECK(a.train.skip_nonfinite == b.train.skip_nonfinite);
  CHECK(a.train.skip_oom == b.train.skip_oom);
  CHECK(a.train.max_skipped_steps == b.train.max_skipped_steps);
  CHECK(a.train.profile_from == b.train.profile_from);
  CHECK(a.train.profile_steps == b.train.profile_steps);

  CHECK(a.eval.every == b.eval.every);
  CHECK(a.eval.batches == b.eval.batches);
  CHECK(a.eval.split == b.eval.split);
  CHECK(a.eval.zero_shot_classes == b.eval.zero_shot_classes);
  CHECK(a.eval.zero_shot_templates == b.eval.zero_shot_templates);

  CHECK(a.data.manifest == b.data.manifest);
  CHECK(a.data.shards == b.data.shards);
  CHECK(a.data.tokenizer == b.data.tokenizer);
  CHECK(a.data.loader_workers == b.data.loader_workers);
  CHECK(a.data.prefetch == b.data.prefetch);
  CHECK(a.data.bucket_batches == b.data.bucket_batches);
  CHECK(a.data.missing_rate == b.data.missing_rate);
  CHECK(a.data.max_bad_fraction == b.data.max_bad_fraction);
  CHECK(a.data.epoch_samples == b.data.epoch_samples);
  REQUIRE(a.data.sources.size() == b.data.sources.size());
  for (size_t i = 0; i < a.data.sources.size(); ++i) {
    CHECK(a.data.sources[i].manifest == b.data.sources[i].manifest);
    CHECK(a.data.sources[i].shards == b.data.sources[i].shards);
    CHECK(a.data.sources[i].weight == b.data.sources[i].weight);
  }
  CHECK(a.multimodal == b.multimodal);
  CHECK(a.prepare == b.prepare);
  CHECK(a.objectives == b.objectives);
  CHECK(a.ablate == b.ablate);
}

struct BadCase {
  std::string name;
  std::string toml;                    // the whole file, read as "bad.toml"
  std::vector<std::string> overrides;  // as --set passes them
  std::string message;                 // the exact ConfigError text
};

// Errors in the text of one file. Each case is as small as the error allows: table-local checks run before the
// cross-table ones, so a case need not be otherwise valid unless the error is a relation between tables.
const std::vector<BadCase> kBadFiles = {
    // ---- TOML syntax --------------------------------------------------------------------------------------------
    {"syntax: value missing", "[train]\nsteps =\n", {},
     "bad.toml:2:8: TOML syntax error: Error while parsing key-value pair: expected value, saw '\\n'"},
    {"syntax: key defined twice", "[train]\nsteps = 1\nsteps = 2\n", {},
     "bad.toml:3:9: TOML syntax error: Error while parsing key-value pair: cannot redefine existing integer 'steps'"},
    {"syntax: unterminated string", "[run]\nname = \"abc\n", {},
     "bad.toml:2:12: TOML syntax error: Error while parsing string: unescaped control characters other than TAB "
     "(U+0009) are explicitly prohibited"},

    // ---- unknown keys, with a suggestion when one is close ------------------------------------------------------
    {"unknown key in [run]", "[run]\nnmae = \"x\"\n", {},
     "bad.toml:2:1: unknown key 'run.nmae'; did you mean 'name'? (valid keys: device, name, output_dir, seed, "
     "task)"},
    {"unknown key in [model]", "[model]\nwidth = 64\nwidht = 64\n", {},
     "bad.toml:3:1: unknown key 'model.widht'; did you mean 'width'? (valid keys: activation_checkpointing, "
     "autocast_residual, depth, dropout, heads, kv_heads, max_length, mlp, mlp_ratio, sub_layernorm, vocab_size, "
     "width)"},
    {"unknown key in [attention]", "[attention]\nsegment_length = [64]\n", {},
     "bad.toml:2:1: unknown key 'attention.segment_length'; did you mean 'segment_lengths'? (valid keys: backend, "
     "bias, causal, dilation_rates, dropout, mix, position, qk_layernorm, relative_max_distance, relative_num_buckets, "
     "rope_theta, segment_lengths, xpos_scale_base)"},
    {"unknown key in [data]", "[data]\ncopus = [\"a.txt\"]\n", {},
     "bad.toml:2:1: unknown key 'data.copus'; did you mean 'corpus'? (valid keys: bucket_batches, corpus, "
     "epoch_samples, loader_workers, manifest, max_bad_fraction, missing_rate, prefetch, sequence_length, shards, "
     "sources, tokenizer, validation_fraction)"},
    {"unknown key in [train]", "[train]\nsteps = 10\nwarmup = 2\n", {},
     "bad.toml:3:1: unknown key 'train.warmup'; did you mean 'warmup_steps'? (valid keys: batch_size, beta1, beta2, "
     "checkpoint_every, grad_accumulation, grad_clip, keep_checkpoints, log_every, lr, max_skipped_steps, "
     "min_lr_ratio, precision, profile_from, profile_steps, sequence_parallel, skip_nonfinite, skip_oom, steps, "
     "warmup_steps, weight_decay)"},
    {"unknown key in [eval]", "[eval]\nevery = 5\nbatch = 2\n", {},
     "bad.toml:3:1: unknown key 'eval.batch'; did you mean 'batches'? (valid keys: batches, every, split, "
     "zero_shot_classes, zero_shot_templates)"},
    {"unknown top-level table", "[trian]\nsteps = 5\n", {},
     "bad.toml:1:2: unknown key 'trian'; did you mean 'train'? (valid keys: ablate, attention, data, eval, "
     "fusion, modalities, model, objectives, prepare, run, train)"},
    {"unknown top-level key without a close match", "learning_rate = 0.1\n", {},
     "bad.toml:1:1: unknown key 'learning_rate' (valid keys: ablate, attention, data, eval, fusion, modalities, "
     "model, objectives, prepare, run, train)"},
    {"first unknown key in file order", "[train]\nzzz = 1\nstpes = 1\n", {},
     "bad.toml:2:1: unknown key 'train.zzz' (valid keys: batch_size, beta1, beta2, checkpoint_every, "
     "grad_accumulation, grad_clip, keep_checkpoints, log_every, lr, max_skipped_steps, min_lr_ratio, precision, "
     "profile_from, profile_steps, sequence_parallel, skip_nonfinite, skip_oom, steps, warmup_steps, "
     "weight_decay)"},

    // ---- wrong types ---------------------------------------------------------------------------------------------
    {"string for an integer", "[train]\nsteps = \"100\"\n", {},
     "bad.toml:2:9: 'train.steps' must be an integer, got a string"},
    {"integer for a boolean", "[attention]\ncausal = 1\n", {},
     "bad.toml:2:10: 'attention.causal' must be a boolean (true or false), got an integer"},
    {"float for an integer", "[train]\nbatch_size = 8.0\n", {},
     "bad.toml:2:14: 'train.batch_size' must be an integer, got a floating-point number"},
    {"string for a number", "[train]\nlr = \"1e-3\"\n", {}, "bad.toml:2:6: 'train.lr' must be a number, got a string"},
    {"nan for a number", "[train]\nlr = nan\n", {}, "bad.toml:2:6: 'train.lr' must be a finite number, got nan"},
    {"scalar for a list", "[attention]\nsegment_lengths = 64\n", {},
     "bad.toml:2:19: 'attention.segment_lengths' must be an array of integers, got an integer"},
    {"string element in an integer list", "[attention]\nsegment_lengths = [64, \"128\"]\n", {},
     "bad.toml:2:24: 'attention.segment_lengths[1]' must be an integer, got a string"},
    {"float element in an integer list", "[attention]\ndilation_rates = [1.5]\n", {},
     "bad.toml:2:19: 'attention.dilation_rates[0]' must be an integer, got a floating-point number"},
    {"integer element in a string list", "[data]\ncorpus = [\"a.txt\", 3]\n", {},
     "bad.toml:2:20: 'data.corpus[1]' must be a string, got an integer"},
    {"value where a table belongs", "model = 3\n", {}, "bad.toml:1:9: 'model' must be a table, got an integer"},

    // ---- out of range and inconsistent ---------------------------------------------------------------------------
    {"dilation rate of 0", "[attention]\nsegment_lengths = [64, 128]\ndilation_rates = [1, 0]\n", {},
     "bad.toml:3:22: 'attention.dilation_rates[1]' must be >= 1, got 0"},
    {"negative segment length", "[attention]\nsegment_lengths = [-64]\ndilation_rates = [1]\n", {},
     "bad.toml:2:20: 'attention.segment_lengths[0]' must be >= 1, got -64"},
    {"segment length not divisible by its rate", "[attention]\nsegment_lengths = [64, 100]\ndilation_rates = [1, 8]\n",
     {}, "bad.toml:3:22: 'attention.dilation_rates[1]' must divide its segment length 100, got 8"},
    {"mismatched list lengths", "[attention]\nsegment_lengths = [64, 128]\ndilation_rates = [1]\n", {},
     "bad.toml:3:18: 'attention.dilation_rates' must have one entry per segment length (2 segment lengths, 1 "
     "dilation rates)"},
    {"empty lists", "[attention]\nsegment_lengths = []\ndilation_rates = []\n", {},
     "bad.toml:2:19: 'attention.segment_lengths' must list at least one segment length"},
    {"model dropout of 1.0", "[model]\ndropout = 1.0\n", {}, "bad.toml:2:11: 'model.dropout' must be in [0, 1), got 1"},
    {"negative attention dropout", "[attention]\ndropout = -0.1\n", {},
     "bad.toml:2:11: 'attention.dropout' must be in [0, 1), got -0.1"},
    {"learning rate 0", "[train]\nlr = 0\n", {}, "bad.toml:2:6: 'train.lr' must be > 0, got 0"},
    {"warmup longer than training", "[train]\nsteps = 10\nwarmup_steps = 20\n", {},
     "bad.toml:3:16: 'train.warmup_steps' must not exceed train.steps (10), got 20"},
    {"min_lr_ratio above 1", "[train]\nmin_lr_ratio = 1.5\n", {},
     "bad.toml:2:16: 'train.min_lr_ratio' must be in [0, 1], got 1.5"},
    {"heads not dividing width", "[model]\nwidth = 100\nheads = 8\n", {},
     "bad.toml:3:9: 'model.heads' must divide model.width (100), got 8"},
    {"kv_heads not dividing heads", "[model]\nheads = 8\nkv_heads = 3\n", {},
     "bad.toml:3:12: 'model.kv_heads' must divide model.heads (8), got 3"},
    {"negative seed", "[run]\nseed = -1\n", {}, "bad.toml:2:8: 'run.seed' must be >= 0, got -1"},
    {"run name with a slash", "[run]\nname = \"a/b\"\n", {},
     "bad.toml:2:8: 'run.name' must be a folder name (not empty, '.' or '..', no '/' or '\\'), got \"a/b\""},
    {"validation fraction 0", "[data]\nvalidation_fraction = 0.0\n", {},
     "bad.toml:2:23: 'data.validation_fraction' must be in (0, 0.5], got 0"},
    {"sequence longer than the model's max_length",
     "[model]\nmax_length = 512\n[attention]\ncausal = true\n[data]\ncorpus = [\"c.txt\"]\nsequence_length = 1024\n",
     {},
     "bad.toml:7:19: 'data.sequence_length' must not exceed model.max_length (512), got 1024"},
    {"max_length below the default sequence length",
     "[model]\nmax_length = 512\n[attention]\ncausal = true\n[data]\ncorpus = [\"c.txt\"]\n", {},
     "bad.toml:2:14: 'model.max_length' must be at least data.sequence_length (1024, the default), got 512"},

    // ---- choices, with a suggestion when one is close ------------------------------------------------------------
    {"backend typo", "[attention]\nbackend = \"flsh\"\n", {},
     "bad.toml:2:11: 'attention.backend' must be one of \"auto\", \"reference\", \"flash\", \"fused\", got \"flsh\"; did you "
     "mean \"flash\"?"},
    {"position with no close choice", "[attention]\nposition = \"rotary\"\n", {},
     "bad.toml:2:12: 'attention.position' must be one of \"none\", \"rope\", \"xpos\", \"relative_bias\", got "
     "\"rotary\""},
    {"precision typo", "[train]\nprecision = \"bf61\"\n", {},
     "bad.toml:2:13: 'train.precision' must be one of \"fp32\", \"bf16\", got \"bf61\"; did you mean \"bf16\"?"},

    // ---- relations across tables ---------------------------------------------------------------------------------
    {"corpus required for an lm: no [data] at all", "[attention]\ncausal = true\n", {},
     "bad.toml:1:1: 'data.corpus' must list at least one text file for run.task = \"lm\""},
    {"corpus required for an lm: empty list", "[attention]\ncausal = true\n[data]\ncorpus = []\n", {},
     "bad.toml:4:10: 'data.corpus' must list at least one text file for run.task = \"lm\""},
    {"an lm needs causal attention", "[attention]\ncausal = false\n[data]\ncorpus = [\"c.txt\"]\n", {},
     "bad.toml:2:10: 'attention.causal' must be true for run.task = \"lm\" (a language model may not see the tokens "
     "it predicts)"},
    {"rope needs an even head dimension",
     "[model]\nwidth = 24\nheads = 8\n[attention]\ncausal = true\nposition = \"rope\"\n[data]\ncorpus = [\"c.txt\"]\n",
     {},
     "bad.toml:6:12: 'attention.position' \"rope\" needs an even head dimension, and model.width / model.heads = 3"},
    {"relative bias on the flash backend",
     "[attention]\ncausal = true\nposition = \"relative_bias\"\nbackend = \"flash\"\n[data]\ncorpus = [\"c.txt\"]\n",
     {},
     "bad.toml:3:12: 'attention.position' \"relative_bias\" is supported by the reference backend only, and "
     "attention.backend is \"flash\""},
    {"relative bias on the fused backend",
     "[attention]\ncausal = true\nposition = \"relative_bias\"\nbackend = \"fused\"\n[data]\ncorpus = [\"c.txt\"]\n",
     {},
     "bad.toml:3:12: 'attention.position' \"relative_bias\" is supported by the reference backend only, and "
     "attention.backend is \"fused\""},

    // ---- [fusion] and [modalities.*] -----------------------------------------------------------------------------
    {"fusion strategy typo", "[fusion]\nstrategy = \"concatseq\"\n", {},
     "bad.toml:2:12: 'fusion.strategy' must be one of \"concat_seq\", \"concat_feature\", \"multiway\", \"late\", "
     "\"bottleneck\", got \"concatseq\"; did you mean \"concat_seq\"?"},
    {"unknown key in [fusion]", "[fusion]\nbottleneck = 4\n", {},
     "bad.toml:2:1: unknown key 'fusion.bottleneck'; did you mean 'bottleneck_tokens'? (valid keys: batch_invariant, "
     "bottleneck_tokens, depth, dilation_rates, embed_dim, parallel_stacks, pooled_length, segment_lengths, strategy)"},
    {"cross-modality layers need a depth", "[fusion]\ndepth = 0\n", {},
     "bad.toml:2:9: 'fusion.depth' must be >= 1, got 0"},
    {"fusion rate not dividing its segment", "[fusion]\nsegment_lengths = [64, 100]\ndilation_rates = [1, 8]\n", {},
     "bad.toml:3:22: 'fusion.dilation_rates[1]' must divide its segment length 100, got 8"},
    {"unknown modality", "[modalities.smell]\nenabled = true\n", {},
     "bad.toml:1:13: unknown key 'modalities.smell' (valid keys: audio, image, text, video)"},
    {"patch modality without patch_dim", "[modalities.image]\nenabled = true\n", {},
     "bad.toml:1:1: 'modalities.image.patch_dim' is required for an enabled modality (values per patch)"},
    {"patch_dim for text", "[modalities.text]\npatch_dim = 3\n", {},
     "bad.toml:2:1: unknown key 'modalities.text.patch_dim' (valid keys: depth, dilation_rates, enabled, "
     "max_positions, positional, segment_lengths, vocab_size)"},
    {"positional typo", "[modalities.audio]\npositional = \"sinusoid\"\n", {},
     "bad.toml:2:14: 'modalities.audio.positional' must be one of \"learned\", \"sinusoidal\", got \"sinusoid\"; did "
     "you mean \"sinusoidal\"?"},
    {"negative stack depth", "[modalities.video]\ndepth = -1\n", {},
     "bad.toml:2:9: 'modalities.video.depth' must be >= 0, got -1"},
    {"text vocabulary of one", "[modalities.text]\nvocab_size = 1\n", {},
     "bad.toml:2:14: 'modalities.text.vocab_size' must be >= 2, got 1"},
    {"multimodal task without a modality", "[run]\ntask = \"multimodal\"\n", {},
     "bad.toml:2:8: 'run.task' \"multimodal\" needs at least one enabled modality ([modalities.text|image|video|audio] "
     "with enabled = true)"},
    {"head_split with more branches in a stack than heads",
     "[run]\ntask = \"multimodal\"\n[model]\nwidth = 64\nheads = 2\nkv_heads = 2\n[attention]\nmix = \"head_split\"\n"
     "segment_lengths = [64]\ndilation_rates = [1]\n[modalities.image]\nenabled = true\npatch_dim = 4\n"
     "segment_lengths = [4, 8, 16]\ndilation_rates = [1, 2, 4]\n",
     {},
     "bad.toml:14:19: 'modalities.image.segment_lengths' has 3 branches, more than model.heads = 2 "
     "(attention.mix = \"head_split\" needs a head per branch)"},
    {"head_split with fewer heads than branches",
     "[model]\nwidth = 64\nheads = 2\nkv_heads = 2\n[attention]\ncausal = true\nsegment_lengths = [64, 128, 256]\n"
     "dilation_rates = [1, 2, 4]\nmix = \"head_split\"\n[data]\ncorpus = [\"c.txt\"]\n",
     {},
     "bad.toml:9:7: 'attention.mix' \"head_split\" needs at least one head per branch, and model.heads = 2 is less "
     "than the 3 branches"},
    {"mix typo", "[attention]\nmix = \"headsplit\"\n", {},
     "bad.toml:2:7: 'attention.mix' must be one of \"lse\", \"head_split\", got \"headsplit\"; did you mean "
     "\"head_split\"?"},
    {"relative bias with too few distances",
     "[attention]\ncausal = true\nposition = \"relative_bias\"\nrelative_num_buckets = 32\n"
     "relative_max_distance = 16\n",
     {},
     "bad.toml:5:25: 'attention.relative_max_distance' must exceed the 16 exactly bucketed distances of "
     "attention.relative_num_buckets = 32, got 16"},
};

// Errors caused by --set. The place is the override as given, since it has no line in any file.
const std::vector<BadCase> kBadOverrides = {
    {"unknown key via --set", kMinimal, {"train.stpes=5"},
     "--set train.stpes=5: unknown key 'train.stpes'; did you mean 'steps'? (valid keys: batch_size, beta1, beta2, "
     "checkpoint_every, grad_accumulation, grad_clip, keep_checkpoints, log_every, lr, max_skipped_steps, "
     "min_lr_ratio, precision, profile_from, profile_steps, sequence_parallel, skip_nonfinite, skip_oom, steps, "
     "warmup_steps, weight_decay)"},
    {"unknown table via --set", kMinimal, {"trian.steps=5"},
     "--set trian.steps=5: unknown key 'trian'; did you mean 'train'? (valid keys: ablate, attention, data, eval, "
     "fusion, modalities, model, objectives, prepare, run, train)"},
    {"word for an integer via --set", kMinimal, {"train.steps=many"},
     "--set train.steps=many: 'train.steps' must be an integer, got a string"},
    {"float for an integer via --set", kMinimal, {"train.steps=7.5"},
     "--set train.steps=7.5: 'train.steps' must be an integer, got a floating-point number"},
    {"word for a boolean via --set", kMinimal, {"attention.causal=yes"},
     "--set attention.causal=yes: 'attention.causal' must be a boolean (true or false), got a string"},
    {"out of range via --set", kMinimal, {"model.dropout=1.0"},
     "--set model.dropout=1.0: 'model.dropout' must be in [0, 1), got 1"},
    {"list element via --set", kMinimal, {"attention.segment_lengths=[64,128]", "attention.dilation_rates=[1,0]"},
     "--set attention.dilation_rates=[1,0]: 'attention.dilation_rates[1]' must be >= 1, got 0"},
    {"choice typo via --set", kMinimal, {"attention.backend=flsh"},
     "--set attention.backend=flsh: 'attention.backend' must be one of \"auto\", \"reference\", \"flash\", \"fused\", got "
     "\"flsh\"; did you mean \"flash\"?"},
    {"--set without '='", kMinimal, {"train.steps"}, "--set train.steps: expected key.path=value"},
    {"--set with an empty key part", kMinimal, {"train..steps=1"},
     "--set train..steps=1: expected key.path=value with a dotted key such as train.steps"},
    {"--set with no key", kMinimal, {"=1"}, "--set =1: expected key.path=value with a dotted key such as train.steps"},
    {"--set below a value", kMinimal, {"data.corpus.x=1"}, "--set data.corpus.x=1: 'data.corpus' is not a table"},
    {"--set of base", kMinimal, {"base=other.toml"}, "--set base=other.toml: 'base' cannot be overridden"},
    {"embedding width 0 via --set", kMinimal, {"fusion.embed_dim=0"},
     "--set fusion.embed_dim=0: 'fusion.embed_dim' must be >= 1, got 0"},
    {"the later of two --set wins, and is the one blamed", kMinimal, {"train.steps=5", "train.steps=0"},
     "--set train.steps=0: 'train.steps' must be >= 1, got 0"},
    {"sequence parallelism with head_split", kMinimal, {"train.sequence_parallel=2", "attention.mix=head_split"},
     "--set train.sequence_parallel=2: 'train.sequence_parallel' needs attention.mix = \"lse\""},
    {"sequence parallelism of zero ranks", kMinimal, {"train.sequence_parallel=0"},
     "--set train.sequence_parallel=0: 'train.sequence_parallel' must be >= 1, got 0"},
};

}  // namespace

TEST_CASE("each bad config file gives one exact message with its location", "[pipelines][config][cpu]") {
  const BadCase c = GENERATE(from_range(kBadFiles));
  CAPTURE(c.name, c.toml);
  CHECK(config_error([&] { parse_experiment(c.toml, "bad.toml", c.overrides); }) == c.message);
}

TEST_CASE("each bad --set gives one exact message naming the override", "[pipelines][config][cpu]") {
  const BadCase c = GENERATE(from_range(kBadOverrides));
  CAPTURE(c.name, c.overrides);
  CHECK(config_error([&] { parse_experiment(c.toml, "bad.toml", c.overrides); }) == c.message);
}

TEST_CASE("a minimal config gets every default", "[pipelines][config][cpu]") {
  const ExperimentConfig c = parse_experiment(kMinimal, "min.toml");
  ExperimentConfig expected;
  expected.attention.dilated.causal = true;
  expected.data.corpus = {"corpus.txt"};
  check_same(c, expected);
  CHECK(c.source == "min.toml");
}

TEST_CASE("overrides are applied and typed like the key they set", "[pipelines][config][cpu]") {
  const ExperimentConfig c = parse_experiment(
      kMinimal, "min.toml",
      {"train.steps=7", "run.name=run7", "train.lr=1", "attention.segment_lengths=[32, 64]",
       "attention.dilation_rates=[1, 2]", "data.corpus=[\"a.txt\", \"b.txt\"]", "model.sub_layernorm=true",
       " train.warmup_steps = 3 ", "run.output_dir=\"out dir\"", "eval.every=0"});
  CHECK(c.train.steps == 7);
  CHECK(c.run.name == "run7");        // a bare word for a string key is the string
  CHECK(c.train.lr == 1.0);           // an integer for a number key is the number
  CHECK(c.attention.dilated.segment_lengths == std::vector<int64_t>{32, 64});
  CHECK(c.attention.dilated.dilation_rates == std::vector<int64_t>{1, 2});
  CHECK(c.data.corpus == std::vector<std::string>{"a.txt", "b.txt"});
  CHECK(c.model.sub_layernorm);
  CHECK(c.train.warmup_steps == 3);   // spaces around key and value are ignored
  CHECK(c.run.output_dir == "out dir");
  CHECK(c.eval.every == 0);
  CHECK(parse_experiment(kMinimal, "min.toml", {"run.name=123"}).run.name == "123");
}

TEST_CASE("to_toml round-trips every field", "[pipelines][config][cpu]") {
  const std::string text = R"(
[run]
name = "round trip"
seed = 12345
device = "cpu"
output_dir = "/tmp/some where"

[model]
width = 96
depth = 3
heads = 6
kv_heads = 2
mlp = "swiglu"
mlp_ratio = 2.6666666666666665
dropout = 0.1
sub_layernorm = true
autocast_residual = true
vocab_size = 300
max_length = 2048

[attention]
segment_lengths = [32, 128, 512]
dilation_rates = [1, 4, 16]
causal = true
backend = "reference"
mix = "head_split"
position = "xpos"
qk_layernorm = true
dropout = 0.05
bias = false
rope_theta = 500000.0
xpos_scale_base = 256.0
relative_num_buckets = 16
relative_max_distance = 64

[data]
corpus = ["a.txt", "dir/b \"quoted\".txt"]
sequence_length = 777
validation_fraction = 0.3333333333333333

[train]
steps = 1000
batch_size = 3
grad_accumulation = 4
lr = 3e-4
min_lr_ratio = 0.0
warmup_steps = 1000
weight_decay = 0.0
beta1 = 0.85
beta2 = 0.999
grad_clip = 0.0
precision = "bf16"
log_every = 1
checkpoint_every = 250
keep_checkpoints = 5

[eval]
every = 0
batches = 1
)";
  const ExperimentConfig c = parse_experiment(text, "full.toml");
  CHECK(c.train.lr == 3e-4);
  CHECK(c.model.mlp_ratio == 8.0 / 3.0);
  const std::string printed = to_toml(c);
  CAPTURE(printed);
  const ExperimentConfig again = parse_experiment(printed, "printed.toml");
  check_same(again, c);
  CHECK(to_toml(again) == printed);

  // Each MLP kind round-trips by name.
  for (const char* mlp : {"gelu", "gelu_tanh", "swiglu"}) {
    CAPTURE(mlp);
    const ExperimentConfig k = parse_experiment(kMinimal, "min.toml", {std::string("model.mlp=") + mlp});
    CHECK(to_toml(k).find(std::string("\nmlp = '") + mlp + "'\n") != std::string::npos);
    check_same(parse_experiment(to_toml(k), "printed.toml"), k);
  }
  CHECK(parse_experiment(kMinimal, "min.toml", {"model.mlp=gelu_tanh"}).model.mlp ==
        longnet::fusion::MlpKind::gelu_tanh);

  // The defaults round-trip too, and sequence parallelism (which the head_split config above excludes).
  const ExperimentConfig defaults = parse_experiment(kMinimal, "min.toml");
  check_same(parse_experiment(to_toml(defaults), "printed.toml"), defaults);
  const ExperimentConfig split = parse_experiment(kMinimal, "min.toml", {"train.sequence_parallel=4"});
  CHECK(split.train.sequence_parallel == 4);
  check_same(parse_experiment(to_toml(split), "printed.toml"), split);
}

TEST_CASE("[fusion] and [modalities.*]: parsed, defaulted and round-tripped", "[pipelines][config][cpu]") {
  const std::string text = R"([run]
task = "multimodal"

[fusion]
strategy = "bottleneck"
depth = 3
segment_lengths = [128, 512]
dilation_rates = [1, 4]
bottleneck_tokens = 8
pooled_length = 32
embed_dim = 64
parallel_stacks = true
batch_invariant = true

[modalities.text]
enabled = true
depth = 4
vocab_size = 32000
max_positions = 8192

[modalities.image]
enabled = true
depth = 0
segment_lengths = [196]
dilation_rates = [1]
patch_dim = 768
positional = "sinusoidal"
max_positions = 32

[modalities.audio]
patch_dim = 128
)";
  const ExperimentConfig c = parse_experiment(text, "mm.toml");
  using longnet::modalities::Modality;
  const auto& mm = c.multimodal;
  CHECK(c.run.task == "multimodal");
  CHECK(mm.fusion.strategy == "bottleneck");
  CHECK(mm.fusion.depth == 3);
  CHECK(mm.fusion.segment_lengths == std::vector<int64_t>{128, 512});
  CHECK(mm.fusion.dilation_rates == std::vector<int64_t>{1, 4});
  CHECK(mm.fusion.bottleneck_tokens == 8);
  CHECK(mm.fusion.pooled_length == 32);
  CHECK(mm.fusion.embed_dim == 64);
  CHECK(mm.fusion.parallel_stacks);
  CHECK(mm.fusion.batch_invariant);
  CHECK(mm[Modality::text].enabled);
  CHECK(mm[Modality::text].depth == 4);
  CHECK(mm[Modality::text].input_dim == 32000);
  CHECK(mm[Modality::text].segment_lengths == std::vector<int64_t>{256});  // default
  CHECK(mm[Modality::text].positional == longnet::modalities::PositionalKind::learned);
  CHECK(mm[Modality::text].max_positions == 8192);
  CHECK(mm[Modality::image].depth == 0);
  CHECK(mm[Modality::image].input_dim == 768);
  CHECK(mm[Modality::image].positional == longnet::modalities::PositionalKind::sinusoidal);
  CHECK_FALSE(mm[Modality::video].enabled);
  CHECK_FALSE(mm[Modality::audio].enabled);  // configured but disabled
  CHECK(mm[Modality::audio].input_dim == 128);

  const std::string printed = to_toml(c);
  CAPTURE(printed);
  CHECK(printed.find("[modalities.audio]") != std::string::npos);
  CHECK(printed.find("[modalities.video]") == std::string::npos);  // all defaults: left out
  const ExperimentConfig again = parse_experiment(printed, "printed.toml");
  check_same(again, c);
  CHECK(to_toml(again) == printed);

  // An LM config has no modality and prints no multimodal table.
  const ExperimentConfig lm = parse_experiment(kMinimal, "min.toml");
  CHECK_FALSE(lm.multimodal.any_enabled());
  CHECK(lm.multimodal == longnet::fusion::MultimodalConfig{});
  CHECK(to_toml(lm).find("[fusion]") == std::string::npos);
  // Fusion settings alone are kept.
  const ExperimentConfig fusion_only = parse_experiment(kMinimal, "min.toml", {"fusion.strategy=late"});
  check_same(parse_experiment(to_toml(fusion_only), "printed.toml"), fusion_only);
  // The example experiment is valid.
  const ExperimentConfig example = load_experiment("experiments/multimodal_tiny.toml");
  CHECK(example.multimodal[Modality::video].positional == longnet::modalities::PositionalKind::sinusoidal);
}

TEST_CASE("[prepare], [objectives], [ablate] and the multimodal [data] keys", "[pipelines][config][cpu]") {
  const std::string text = R"([run]
task = "multimodal"

[data]
manifest = "data/demo/manifest.jsonl"
shards = "data/demo/shards"
tokenizer = "data/demo/tok.model"
loader_workers = 3
missing_rate = 0.25

[prepare]
video_size = 64
video_patch = 8
video_tubelet = 2
mel_bins = 40
mel_frames_per_patch = 8
on_bad = "fail"

[objectives]
video_text = 0.5
media_text = 2.0
lm = 0.1
learn_temperature = false

[eval]
zero_shot_classes = ["left", "right", "up", "down"]
zero_shot_templates = ["shapes moving {}", "a video of {}"]

[ablate]
strategies = ["late", "bottleneck"]
missing_rates = [0.0, 0.3]
seeds = [1, 2, 3]

[modalities.text]
enabled = true
vocab_size = 600

[modalities.video]
enabled = true
patch_dim = 384

[modalities.audio]
enabled = true
patch_dim = 320
)";
  const ExperimentConfig c = parse_experiment(text, "mm.toml");
  CHECK(c.data.shards == "data/demo/shards");
  CHECK(c.data.loader_workers == 3);
  CHECK(c.data.missing_rate == 0.25);
  CHECK(c.prepare.video_patch_dim() == 384);
  CHECK(c.prepare.audio_patch_dim() == 320);
  CHECK(c.prepare.on_bad == "fail");
  CHECK(c.objectives.video_text == 0.5);
  CHECK(c.objectives.audio_text == 1.0);  // default
  CHECK_FALSE(c.objectives.learn_temperature);
  CHECK(c.ablate.strategies == std::vector<std::string>{"late", "bottleneck"});
  CHECK(c.ablate.missing_rates == std::vector<double>{0.0, 0.3});
  CHECK(c.ablate.seeds == std::vector<int64_t>{1, 2, 3});
  CHECK(c.eval.zero_shot_classes.size() == 4);
  CHECK(c.eval.zero_shot_templates[1] == "a video of {}");
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"eval.zero_shot_templates=[\"no slot\"]"}); }).find(
            "'eval.zero_shot_templates[0]' must contain \"{}\" exactly once") != std::string::npos);
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"eval.zero_shot_classes=[\"a\", \"a\"]"}); }).find(
            "'eval.zero_shot_classes[1]' repeats \"a\"") != std::string::npos);
  const std::string printed = to_toml(c);
  CAPTURE(printed);
  check_same(parse_experiment(printed, "printed.toml"), c);
  CHECK(to_toml(parse_experiment(printed, "printed.toml")) == printed);

  // Cross-table checks name the key to change and the values involved.
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"prepare.video_tubelet=1"}); }) ==
        "mm.toml:40:13: 'modalities.video.patch_dim' must be 192, the values per patch that prepare.video_patch = 8 "
        "and video_tubelet = 1 give, got 384");
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"prepare.tokenizer_vocab_size=1000"}); }) ==
        "mm.toml:36:14: 'modalities.text.vocab_size' must be at least prepare.tokenizer_vocab_size (1000), got 600");
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"prepare.video_patch=7"}); }) ==
        "--set prepare.video_patch=7: 'prepare.video_patch' must divide prepare.video_size (64), got 7");
  CHECK(config_error([&] {
          parse_experiment(text, "mm.toml",
                           {"objectives.video_text=0", "objectives.audio_text=0", "objectives.media_text=0",
                            "objectives.lm=0"});
        }).find("no objective has a positive weight") != std::string::npos);
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"prepare.audio_seconds=40"}); }) ==
        "--set prepare.audio_seconds=40: 'prepare.audio_seconds' must be in [0, prepare.audio_max_seconds = 30] (0: "
        "clips keep their length), got 40");
  CHECK(parse_experiment(text, "mm.toml", {"prepare.audio_seconds=4", "prepare.audio_fit=\"loop\""}).prepare.audio_fit ==
        "loop");
  const auto clips = parse_experiment(text, "mm.toml", {"prepare.eval_clips=3", "prepare.video_clip_seconds=2.5"});
  CHECK(clips.prepare.eval_clips == 3);
  CHECK(clips.prepare.video_clip_seconds == 2.5);
  check_same(parse_experiment(to_toml(clips), "printed.toml"), clips);
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"prepare.eval_clips=0"}); }) ==
        "--set prepare.eval_clips=0: 'prepare.eval_clips' must be >= 1, got 0");
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"prepare.train_clips=0"}); }) ==
        "--set prepare.train_clips=0: 'prepare.train_clips' must be >= 1, got 0");
  CHECK(parse_experiment(text, "mm.toml", {"prepare.train_clips=4"}).prepare.train_clips == 4);
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"prepare.video_clip_seconds=-1"}); }) ==
        "--set prepare.video_clip_seconds=-1: 'prepare.video_clip_seconds' must be >= 0 (0: the whole video), got -1");
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"data.missing_rate=1.0"}); }) ==
        "--set data.missing_rate=1.0: 'data.missing_rate' must be in [0, 1), got 1");
  CHECK(config_error([&] { parse_experiment(text, "mm.toml", {"ablate.seeds=[1,-2]"}); }) ==
        "--set ablate.seeds=[1,-2]: 'ablate.seeds[1]' must be >= 0, got -2");
  // An LM config prints none of these tables.
  const std::string lm = to_toml(parse_experiment(kMinimal, "min.toml"));
  CHECK(lm.find("[prepare]") == std::string::npos);
  CHECK(lm.find("[objectives]") == std::string::npos);
  CHECK(lm.find("manifest") == std::string::npos);
  // The quickstart is valid.
  CHECK(load_experiment("experiments/quickstart.toml").run.task == "multimodal");
}

TEST_CASE("data.sources: weighted datasets, the first one evaluated", "[pipelines][config][cpu]") {
  const std::string text = R"([run]
task = "multimodal"
[modalities.text]
enabled = true
vocab_size = 512
[modalities.video]
enabled = true
patch_dim = 768
[data]
tokenizer = "tok.model"
epoch_samples = 500
sources = [
  {manifest = "a/manifest.jsonl", shards = "a/shards", weight = 2.0},
  {shards = "b/shards"},
]
)";
  const ExperimentConfig c = parse_experiment(text, "mix.toml");
  REQUIRE(c.data.sources.size() == 2);
  CHECK(c.data.sources[0].weight == 2.0);
  CHECK(c.data.sources[1].weight == 1.0);
  CHECK(c.data.sources[1].manifest.empty());
  CHECK(c.data.shards == "a/shards");  // the evaluation dataset
  CHECK(c.data.manifest == "a/manifest.jsonl");
  CHECK(c.data.epoch_samples == 500);
  CHECK(longnet::pipelines::training_sources(c.data).size() == 2);
  const std::string printed = to_toml(c);
  CAPTURE(printed);
  check_same(parse_experiment(printed, "printed.toml"), c);
  CHECK(to_toml(parse_experiment(printed, "printed.toml")) == printed);

  // One dataset without sources is one training source of weight 1.
  const ExperimentConfig one = parse_experiment("[run]\ntask = \"multimodal\"\n[modalities.text]\nenabled = true\nvocab_size = 512\n[modalities.video]\nenabled = true\npatch_dim = 768\n[data]\nshards = \"s\"\n", "one.toml");
  REQUIRE(longnet::pipelines::training_sources(one.data).size() == 1);
  CHECK(longnet::pipelines::training_sources(one.data)[0].shards == "s");

  CHECK(config_error([&] { parse_experiment(text + "shards = \"x\"\n", "mix.toml"); }) ==
        "mix.toml:16:10: 'data.shards' cannot be set together with data.sources (the first source is the evaluation "
        "dataset; set it to \"\" where a base config gives it)");
  CHECK(parse_experiment(text + "shards = \"\"\nmanifest = \"\"\n", "mix.toml").data.shards == "a/shards");
  CHECK(config_error([&] {
          parse_experiment("[run]\ntask = \"multimodal\"\n[data]\nsources = [{manifest = \"m\"}]\n", "m.toml");
        }) == "m.toml:4:12: missing required key 'data.sources[0].shards'");
  CHECK(config_error([&] {
          parse_experiment("[data]\nsources = [{shards = \"a\"}, {shards = \"b\", weight = 0}]\n", "w.toml");
        }) == "w.toml:2:52: 'data.sources[1].weight' must be > 0, got 0");
  CHECK(config_error([&] {
          parse_experiment("[data]\nsources = [{shards = \"a\", wieght = 2.0}]\n", "k.toml");
        }).find("'data.sources[0].wieght'") != std::string::npos);
  CHECK(config_error([&] { parse_experiment("[data]\nsources = [\"a\"]\n", "t.toml"); }) ==
        "t.toml:2:12: 'data.sources[0]' must be a table, got a string");
  CHECK(config_error([&] { parse_experiment(kMinimal, "e.toml", {"data.epoch_samples=-1"}); }) ==
        "--set data.epoch_samples=-1: 'data.epoch_samples' must be >= 0, got -1");
}

TEST_CASE("to_toml reads like the schema: tables in order, floats in their shortest form", "[pipelines][config][cpu]") {
  const std::string printed = to_toml(parse_experiment(kMinimal, "min.toml", {"train.lr=3e-4"}));
  CAPTURE(printed);
  size_t last = 0;
  for (const char* table : {"[run]\n", "[model]\n", "[attention]\n", "[data]\n", "[train]\n", "[eval]\n"}) {
    const size_t at = printed.find(table);
    CHECK(at != std::string::npos);
    CHECK(at >= last);
    last = at;
  }
  CHECK(printed.rfind("[run]\nname = ", 0) == 0);
  CHECK(printed.find("\nvalidation_fraction = 0.1\n") != std::string::npos);
  CHECK(printed.find("\nlr = 3e-04\n") != std::string::npos);
  CHECK(printed.find("\nmlp_ratio = 4.0\n") != std::string::npos);  // a float stays a float
  CHECK(printed.find("\nsegment_lengths = [2048]\n") != std::string::npos);
}

TEST_CASE("base inheritance merges tables key by key and the including file wins", "[pipelines][config][cpu]") {
  const TempDir dir;
  dir.write("common/base.toml", R"([run]
name = "from_base"
seed = 3
[model]
width = 64
heads = 4
[attention]
causal = true
segment_lengths = [16, 32]
dilation_rates = [1, 2]
[data]
corpus = ["base.txt"]
[train]
steps = 10
lr = 0.5
)");
  const fs::path child = dir.write("exp/child.toml", R"(base = "../common/base.toml"
[run]
name = "from_child"
[train]
steps = 20
[eval]
batches = 3
)");

  SECTION("child wins, nested tables merge, base-only tables come through") {
    const ExperimentConfig c = load_experiment(child);
    CHECK(c.run.name == "from_child");
    CHECK(c.run.seed == 3);
    CHECK(c.model.width == 64);
    CHECK(c.model.heads == 4);
    CHECK(c.attention.dilated.segment_lengths == std::vector<int64_t>{16, 32});
    CHECK(c.train.steps == 20);
    CHECK(c.train.lr == 0.5);
    CHECK(c.eval.batches == 3);
    CHECK(c.data.corpus == std::vector<std::string>{"base.txt"});
    CHECK(c.source == child);
  }
  SECTION("overrides apply after inheritance") {
    const ExperimentConfig c = load_experiment(child, {"train.lr=0.25", "run.seed=9"});
    CHECK(c.train.lr == 0.25);
    CHECK(c.run.seed == 9);
    CHECK(c.train.steps == 20);
  }
  SECTION("a chain of bases resolves each path against its own file") {
    const fs::path grandchild =
        dir.write("exp/deeper/grandchild.toml", "base = \"../child.toml\"\n[train]\nlr = 0.125\n");
    const ExperimentConfig c = load_experiment(grandchild);
    CHECK(c.train.lr == 0.125);
    CHECK(c.train.steps == 20);
    CHECK(c.run.name == "from_child");
    CHECK(c.model.width == 64);
  }
  SECTION("the printed config is the merged one and has no base key") {
    const std::string printed = to_toml(load_experiment(child));
    CHECK(printed.rfind("base", 0) != 0);
    CHECK(printed.find("\nbase") == std::string::npos);
    CHECK(printed.find("from_child") != std::string::npos);
    CHECK(printed.find("lr = 0.5") != std::string::npos);
    check_same(parse_experiment(printed, "printed.toml"), load_experiment(child));
  }
}

TEST_CASE("base inheritance errors name the file and position", "[pipelines][config][cpu]") {
  const TempDir dir;
  const auto at = [&](const std::string& name) { return (dir.path() / name).string(); };

  SECTION("missing base file") {
    const fs::path a = dir.write("a.toml", "base = \"nowhere.toml\"\n");
    CHECK(config_error([&] { load_experiment(a); }) ==
          at("a.toml") + ":1:8: 'base' must name an existing TOML file, got '" + at("nowhere.toml") + "'");
  }
  SECTION("cycle a -> b -> a") {
    const fs::path a = dir.write("a.toml", "base = \"b.toml\"\n");
    dir.write("b.toml", "# b\nbase = \"a.toml\"\n");
    CHECK(config_error([&] { load_experiment(a); }) ==
          at("b.toml") + ":2:8: 'base' forms an inheritance cycle: a.toml -> b.toml -> a.toml");
  }
  SECTION("a file that is its own base") {
    const fs::path a = dir.write("a.toml", "base = \"./a.toml\"\n");
    CHECK(config_error([&] { load_experiment(a); }) ==
          at("a.toml") + ":1:8: 'base' forms an inheritance cycle: a.toml -> a.toml");
  }
  SECTION("base that is not a string") {
    const fs::path a = dir.write("a.toml", "base = [\"b.toml\"]\n");
    CHECK(config_error([&] { load_experiment(a); }) ==
          at("a.toml") + ":1:8: 'base' must be a string (a path to a TOML file), got an array");
  }
  SECTION("an error in the base file points into the base file") {
    dir.write("b.toml", "[train]\nsteps = 0\n");
    const fs::path a = dir.write("a.toml", "base = \"b.toml\"\n[attention]\ncausal = true\n");
    CHECK(config_error([&] { load_experiment(a); }) == at("b.toml") + ":2:9: 'train.steps' must be >= 1, got 0");
  }
  SECTION("an error in the including file keeps its position after the merge") {
    dir.write("b.toml", "[attention]\ncausal = true\nsegment_lengths = [64, 128]\n");
    const fs::path a = dir.write("a.toml", "base = \"b.toml\"\n\n[attention]\ndilation_rates = [1, 0]\n");
    CHECK(config_error([&] { load_experiment(a); }) ==
          at("a.toml") + ":4:22: 'attention.dilation_rates[1]' must be >= 1, got 0");
  }
  SECTION("an unknown key in the including file keeps its position after the merge") {
    dir.write("b.toml", "[train]\nsteps = 10\n");
    const fs::path a = dir.write("a.toml", "base = \"b.toml\"\n[train]\nstpes = 20\n");
    CHECK(config_error([&] { load_experiment(a); }) ==
          at("a.toml") + ":3:1: unknown key 'train.stpes'; did you mean 'steps'? (valid keys: batch_size, beta1, "
                         "beta2, checkpoint_every, grad_accumulation, grad_clip, keep_checkpoints, log_every, lr, "
                         "max_skipped_steps, min_lr_ratio, precision, profile_from, profile_steps, "
                         "sequence_parallel, skip_nonfinite, "
                         "skip_oom, steps, warmup_steps, weight_decay)");
  }
  SECTION("a syntax error in the base file") {
    dir.write("b.toml", "[train\n");
    const fs::path a = dir.write("a.toml", "base = \"b.toml\"\n");
    CHECK(config_error([&] { load_experiment(a); }) ==
          at("b.toml") + ":1:7: TOML syntax error: Error while parsing table header: expected ']', saw '\\n'");
  }
  SECTION("a missing config file") {
    CHECK(config_error([&] { load_experiment(dir.path() / "absent.toml"); }) ==
          at("absent.toml") + ": cannot read config file (no such file)");
  }
  SECTION("base in text that has no file to resolve against") {
    CHECK(config_error([&] { parse_experiment("base = \"b.toml\"\n", "text.toml"); }) ==
          "text.toml:1:8: 'base' needs the config to be read from a file (its path is relative to that file)");
  }
}
