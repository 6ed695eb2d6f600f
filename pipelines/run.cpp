#include "pipelines/run.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <optional>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "distributed/data_parallel.h"
#include "distributed/process_group.h"
#include "distributed/sequence_parallel.h"
#include "fusion/longnet_lm.h"
#include "pipelines/multimodal_run.h"
#include "pipelines/text_corpus.h"
#include "pipelines/training.h"

namespace longnet::pipelines {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Next-byte loss over (B, N+1) windows: inputs [:, :-1], targets [:, 1:]. With a shard (sequence parallelism), the
// model sees the inputs of this rank's part [shard.start, shard.start + part_length) only, and the loss is that
// part's share of the mean: its tokens' cross-entropy summed and divided by all B·N targets, so the shares of a
// sequence group add up to the mean.
torch::Tensor lm_loss(fusion::LongNetLM& model, const torch::Tensor& windows,
                      const attention::SequenceShard* shard = nullptr, int64_t part_length = 0) {
  const int64_t n = windows.size(1) - 1;
  const int64_t start = shard ? shard->start : 0, count = shard ? part_length : n;
  const auto logits = model->forward(windows.narrow(1, start, count), std::nullopt, shard);  // (B, count, V)
  const auto sum = torch::nn::functional::cross_entropy(
      logits.reshape({-1, logits.size(-1)}).to(torch::kFloat32), windows.narrow(1, start + 1, count).reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  return sum / static_cast<double>(windows.size(0) * n);
}

double evaluate(fusion::LongNetLM& model, const torch::Tensor& windows, int64_t batch, torch::Device device) {
  torch::NoGradGuard no_grad;
  model->eval();
  double total = 0;
  int64_t count = 0;
  for (int64_t s = 0; s < windows.size(0); s += batch) {
    const auto chunk = windows.narrow(0, s, std::min(batch, windows.size(0) - s)).to(device);
    total += lm_loss(model, chunk).item<double>() * static_cast<double>(chunk.size(0));
    count += chunk.size(0);
  }
  model->train();
  return total / static_cast<double>(count);
}

fs::path train_language_model(const ExperimentConfig& c, const RunOptions& options) {
  if (c.train.skip_oom && distributed::launch_env_from_environment()) {
    throw ConfigError("train.skip_oom works in one process only: ranks would disagree on which steps to skip");
  }
  // A distributed launch (`longnet run --nproc N`, or a launcher's RANK/WORLD_SIZE): each group of
  // train.sequence_parallel consecutive ranks splits every sample's sequence (LongNet sequence parallelism), and the
  // world/train.sequence_parallel groups are data parallel: each samples its own batches. Rank 0 alone evaluates
  // (on whole sequences) and writes the run folder.
  const auto launch = distributed::launch_env_from_environment();
  const int rank = launch ? launch->rank : 0, world = launch ? launch->world_size : 1;
  check_ranks(c, world);
  const int sequence_size = static_cast<int>(c.train.sequence_parallel);
  const int data_rank = rank / sequence_size, data_size = world / sequence_size;
  torch::Device device = choose_device(c.run);
  if (world > 1 && device.is_cuda()) {
    device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(launch->local_rank %
                                                                       static_cast<int>(torch::cuda::device_count())));
  }
  if (c.train.precision == "bf16" && !device.is_cuda()) {
    throw ConfigError("train.precision = \"bf16\" needs a CUDA device; this run uses the CPU");
  }
  // Data errors surface before anything is written.
  const TextCorpus corpus(c.data.corpus, c.data.validation_fraction, c.data.sequence_length + 1);

  torch::manual_seed(static_cast<uint64_t>(c.run.seed));
  fusion::LongNetLM model(c.model, c.attention);
  model->to(device);
  auto optimizer = make_adamw(model->parameters(), c.train);
  const CheckpointModules modules{.model = model.ptr().get(), .extras = {}};

  // Resuming: the model, optimizer, step and both random generators come back from the newest checkpoint.
  const ResumePoint resumed = resume_point(options.resume, modules, *optimizer);
  const int64_t first_step = resumed.first_step;
  const std::optional<int64_t> resume_step = resumed.log_step;

  distributed::ProcessGroups groups;
  std::unique_ptr<distributed::GradientAllReduce> grad_sync;
  std::optional<attention::SequenceShard> shard;
  int64_t part_length = c.data.sequence_length;
  if (world > 1) {
    groups = distributed::make_process_groups(*launch, sequence_size, device.type());
    // The ranks of a sequence group hold partial gradients of the same samples: summed over the world, averaged
    // over the data groups.
    grad_sync = std::make_unique<distributed::GradientAllReduce>(
        model->parameters(), groups.world,
        distributed::GradientAllReduceOptions{.divide_by = static_cast<double>(data_size)});
    if (sequence_size > 1) {
      shard = distributed::sequence_shard(groups.sequence, c.data.sequence_length);
      part_length = distributed::sequence_part(c.data.sequence_length, sequence_size, groups.sequence.rank()).length;
    }
  }

  const fs::path run_dir = rank != 0 ? fs::path() : !options.resume.empty() ? options.resume : fresh_run_dir(c.run);
  if (rank == 0) write_file_atomic(run_dir / "config.toml", to_toml(c));
  RunLogger logger(run_dir, resume_step);
  const auto validation = corpus.validation_windows(c.eval.batches * c.train.batch_size);
  const double unigram_bpb = corpus.unigram_bits_per_byte();
  const int64_t params = model->num_parameters();
  log::info("run folder " + run_dir.string() + " | device " + device.str() + " | " + std::to_string(params) +
            " parameters | corpus " + std::to_string(corpus.train_bytes()) + " train / " +
            std::to_string(corpus.validation_bytes()) + " validation bytes | attention backend " +
            attention::to_string(c.attention.dilated.backend));
  for (const auto& w : c.attention.dilated.coverage_warnings(c.model.heads)) log::warn("attention: " + w);
  if (shard) {
    log::info("sequence parallel: " + std::to_string(sequence_size) + " ranks split each sequence (this rank: " +
              std::to_string(part_length) + " of " + std::to_string(c.data.sequence_length) + " tokens), " +
              std::to_string(data_size) + " data-parallel groups");
  }

  double initial_val = 0;
  if (rank == 0 && first_step == 0) {
    initial_val = evaluate(model, validation, c.train.batch_size, device);
    log::info("step 0: validation loss " + std::to_string(initial_val) + " nats/byte (unigram baseline " +
              std::to_string(unigram_bpb) + " bits/byte)");
    logger.log("val", 0, {{"loss", initial_val}, {"bits_per_byte", initial_val / std::log(2.0)}});
  }

  const int64_t tokens_per_step = c.train.batch_size * c.train.grad_accumulation * c.data.sequence_length * data_size;
  const ProgressLine progress(first_step, c.train.steps);
  auto window_start = std::chrono::steady_clock::now();
  double train_loss = 0, val_loss = initial_val, window_loss = 0;
  int64_t window_steps = 0;
  StepProfiler profiler(c.train, run_dir, device.is_cuda());
  StepFailures failures(c.train);
  for (int64_t step = first_step; step < c.train.steps; ++step) {
    profiler.before_step(step);
    const double lr = learning_rate(c.train, step);
    set_learning_rate(*optimizer, lr);
    optimizer->zero_grad();
    double step_loss = std::numeric_limits<double>::quiet_NaN(), grad_norm = 0;
    bool apply = false;
    try {
      at::Tensor step_loss_t;  // on the device, summed in double as the host sum it replaces
      // The windows of a step come from a generator seeded by (seed, data group, step): a resumed run draws what the
      // uninterrupted one would, on every data group, and the ranks of a sequence group draw the same windows.
      std::seed_seq sampler_seed{static_cast<uint64_t>(c.run.seed), static_cast<uint64_t>(data_rank),
                                 static_cast<uint64_t>(step)};
      std::mt19937_64 sampler(sampler_seed);
      for (int64_t micro = 0; micro < c.train.grad_accumulation; ++micro) {
        const auto batch = corpus.sample_train(c.train.batch_size, sampler).to(device);
        torch::Tensor loss;
        {
          const AutocastGuard autocast(c.train.precision == "bf16");
          loss = lm_loss(model, batch, shard ? &*shard : nullptr, part_length);
        }
        if (injected_at(options.inject_nonfinite_steps, step)) loss = loss * std::numeric_limits<double>::quiet_NaN();
        if (injected_at(options.inject_oom_steps, step)) throw_injected_oom(step);
        if (grad_sync && micro + 1 == c.train.grad_accumulation) grad_sync->arm();  // the last backward all-reduces
        (loss / static_cast<double>(c.train.grad_accumulation)).backward();
        const at::Tensor part = loss.detach().to(torch::kDouble) / static_cast<double>(c.train.grad_accumulation);
        step_loss_t = step_loss_t.defined() ? step_loss_t + part : part;
      }
      if (grad_sync) {  // gradients averaged over the data groups; the logged loss too (a sequence group's sum)
        grad_sync->finish();
        auto total = step_loss_t.reshape({1});
        groups.world.all_reduce(total);
        step_loss = total.item<double>() / static_cast<double>(data_size);
        if (std::isfinite(step_loss) && c.train.grad_clip > 0) {
          grad_norm = clip_grad_norm(model->parameters(), c.train.grad_clip);
        }
      } else {
        const StepValues read = read_loss_and_clip(step_loss_t, model->parameters(), c.train.grad_clip);
        step_loss = read.loss;
        grad_norm = read.grad_norm;
      }
      apply = failures.accept(step, step_loss, grad_norm);
    } catch (const c10::OutOfMemoryError& e) {
      failures.out_of_memory(step, e);
    }
    if (!apply) {  // a skipped step: its gradients are dropped
      optimizer->zero_grad();
      profiler.after_step(step);
    } else {
      optimizer->step();
      profiler.after_step(step);
      train_loss = step_loss;
      window_loss += step_loss;
      ++window_steps;
    }

    const int64_t done = step + 1;
    if (done % c.train.log_every == 0 || done == c.train.steps) {
      const auto now = std::chrono::steady_clock::now();
      const double window_s = std::chrono::duration<double>(now - window_start).count();
      const double tok_s = static_cast<double>(tokens_per_step * window_steps) / window_s;
      std::ostringstream fields;
      fields.precision(4);
      fields << "loss " << window_loss / std::max<int64_t>(window_steps, 1) << " | lr " << lr << " | grad norm " << grad_norm << " | "
             << static_cast<int64_t>(tok_s) << " tok/s";
      log::info(progress.format(done, fields.str()));
      logger.log("train", done, {{"loss", window_loss / std::max<int64_t>(window_steps, 1)}, {"lr", lr},
                                 {"grad_norm", grad_norm}, {"tokens_per_s", tok_s},
                                 {"elapsed_s", progress.elapsed_seconds()},
                                 {"skipped_nonfinite", failures.skipped_nonfinite()},
                                 {"skipped_oom", failures.skipped_oom()}});
      window_start = now;
      window_loss = 0;
      window_steps = 0;
    }
    const bool last = done == c.train.steps;
    if (rank == 0 && ((c.eval.every > 0 && done % c.eval.every == 0) || last)) {
      val_loss = evaluate(model, validation, c.train.batch_size, device);
      log::info("step " + std::to_string(done) + ": validation loss " + std::to_string(val_loss) + " nats/byte = " +
                std::to_string(val_loss / std::log(2.0)) + " bits/byte");
      logger.log("val", done, {{"loss", val_loss}, {"bits_per_byte", val_loss / std::log(2.0)}});
    }
    if (rank == 0 && ((c.train.checkpoint_every > 0 && done % c.train.checkpoint_every == 0) || last)) {
      save_checkpoint(run_dir, done, modules, *optimizer, json::object(), c.train.keep_checkpoints);
    }
  }

  const double seconds = progress.elapsed_seconds();
  json summary = {
      {"task", "lm"},
      {"steps", c.train.steps},
      {"tokens", tokens_per_step * c.train.steps},
      {"parameters", params},
      {"train_seconds", seconds},
      {"final_train_loss", train_loss},
      {"final_val_bits_per_byte", val_loss / std::log(2.0)},
      {"unigram_bits_per_byte", unigram_bpb},
      {"device", device.str()},
      {"skipped_nonfinite_steps", failures.skipped_nonfinite()},
      {"skipped_oom_steps", failures.skipped_oom()},
  };
  if (first_step == 0) summary["initial_val_bits_per_byte"] = initial_val / std::log(2.0);
  if (resume_step) summary["resumed_from_step"] = first_step;
  if (rank != 0) return run_dir;
  write_file_atomic(run_dir / "summary.json", summary.dump(2) + "\n");
  log::info("done in " + format_duration(seconds) + ": validation " + std::to_string(val_loss / std::log(2.0)) +
            " bits/byte (a unigram model of the training bytes gets " + std::to_string(unigram_bpb) + ")");
  log::info("wrote " + (run_dir / "summary.json").string());
  return run_dir;
}

}  // namespace

void check_ranks(const ExperimentConfig& config, int ranks) {
  if (ranks % config.train.sequence_parallel != 0) {
    throw ConfigError("train.sequence_parallel = " + std::to_string(config.train.sequence_parallel) +
                      " must divide the number of ranks (" + std::to_string(ranks) +
                      "; launch with `longnet run --nproc N`)");
  }
}

fs::path run_experiment(const ExperimentConfig& config, const RunOptions& options) {
  if (!options.resume.empty() && !fs::is_directory(options.resume)) {
    throw ConfigError("resume: '" + options.resume.string() + "' is not a run folder");
  }
  if (config.run.task == "lm") return train_language_model(config, options);
  if (config.run.task == "multimodal") return train_multimodal(config, options);
  throw ConfigError("run.task \"" + config.run.task + "\" has no runner");
}

}  // namespace longnet::pipelines
