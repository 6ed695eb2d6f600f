#include "pipelines/run.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include <ATen/autocast_mode.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "distributed/data_parallel.h"
#include "distributed/process_group.h"
#include "fusion/longnet_lm.h"
#include "pipelines/text_corpus.h"

namespace longnet::pipelines {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

torch::Device choose_device(const RunConfig& run) {
  const bool cuda = torch::cuda::is_available();
  if (run.device == "cuda" && !cuda) {
    throw ConfigError("run.device = \"cuda\" but no CUDA device is visible to torch");
  }
  return (run.device == "cuda" || (run.device == "auto" && cuda)) ? torch::Device(torch::kCUDA) : torch::kCPU;
}

// <output_dir>/<name>, or <name>-2, -3, ... when earlier runs exist: a new run never overwrites an old one.
fs::path fresh_run_dir(const RunConfig& run) {
  const fs::path base = fs::path(run.output_dir) / run.name;
  fs::path dir = base;
  for (int i = 2; fs::exists(dir); ++i) dir = base.string() + "-" + std::to_string(i);
  std::error_code ec;
  fs::create_directories(dir / "checkpoints", ec);
  if (ec) throw IoError("cannot create run folder '" + dir.string() + "': " + ec.message());
  return dir;
}

std::string format_duration(double seconds) {
  const auto s = static_cast<int64_t>(std::llround(seconds));
  std::ostringstream ss;
  if (s >= 3600) ss << s / 3600 << "h";
  if (s >= 60) ss << (s / 60) % 60 << "m";
  ss << s % 60 << "s";
  return ss.str();
}

// Linear warmup to lr, then cosine decay to lr · min_lr_ratio at the last step.
double learning_rate(const TrainConfig& t, int64_t step) {
  if (step < t.warmup_steps) return t.lr * static_cast<double>(step + 1) / static_cast<double>(t.warmup_steps);
  const double span = std::max<int64_t>(1, t.steps - t.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - t.warmup_steps) / span);
  const double floor = t.lr * t.min_lr_ratio;
  return floor + 0.5 * (t.lr - floor) * (1.0 + std::cos(M_PI * progress));
}

// An empty path: a rank other than 0 of a distributed run, which writes nothing.
class MetricsLog {
 public:
  explicit MetricsLog(const fs::path& path) {
    if (path.empty()) return;
    out_.open(path, std::ios::app);
    if (!out_) throw IoError("cannot open '" + path.string() + "' for writing");
  }
  void write(const json& record) {
    if (!out_.is_open()) return;
    out_ << record.dump() << "\n";
    out_.flush();
    if (!out_) throw IoError("cannot write metrics (disk full?)");
  }

 private:
  std::ofstream out_;
};

// Next-byte loss over (B, N+1) windows: inputs [:, :-1], targets [:, 1:].
torch::Tensor lm_loss(fusion::LongNetLM& model, const torch::Tensor& windows) {
  const int64_t n = windows.size(1) - 1;
  const auto logits = model->forward(windows.narrow(1, 0, n));  // (B, N, V)
  return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}).to(torch::kFloat32),
                                              windows.narrow(1, 1, n).reshape({-1}));
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

void save_checkpoint(fusion::LongNetLM& model, torch::optim::Optimizer& optimizer, int64_t step, const fs::path& dir,
                     int64_t keep) {
  torch::serialize::OutputArchive archive;
  model->save(archive);
  torch::serialize::OutputArchive optim;
  optimizer.save(optim);
  archive.write("optimizer", optim);
  archive.write("step", torch::tensor(step));
  char name[32];
  std::snprintf(name, sizeof(name), "step_%08lld.pt", static_cast<long long>(step));
  const fs::path final_path = dir / name;
  const fs::path tmp = final_path.string() + ".tmp";
  archive.save_to(tmp.string());
  std::error_code ec;
  fs::rename(tmp, final_path, ec);
  if (ec) throw IoError("cannot move checkpoint into place '" + final_path.string() + "': " + ec.message());
  // Keep the newest `keep` checkpoints (names sort by step).
  std::vector<fs::path> all;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".pt") all.push_back(e.path());
  }
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) fs::remove(all[i]);
}

fs::path train_language_model(const ExperimentConfig& c) {
  // A distributed launch (`longnet run --nproc N`, or a launcher's RANK/WORLD_SIZE): data parallelism over every
  // rank; each rank samples its own batches, rank 0 alone evaluates and writes the run folder.
  const auto launch = distributed::launch_env_from_environment();
  const int rank = launch ? launch->rank : 0, world = launch ? launch->world_size : 1;
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
  std::mt19937_64 rng(static_cast<uint64_t>(c.run.seed) + static_cast<uint64_t>(rank));
  fusion::LongNetLM model(c.model, c.attention);
  model->to(device);

  std::vector<torch::Tensor> decay, no_decay;
  for (auto& p : model->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  torch::optim::AdamW optimizer(
      {torch::optim::OptimizerParamGroup(decay, std::make_unique<torch::optim::AdamWOptions>(
                                                    torch::optim::AdamWOptions(c.train.lr)
                                                        .betas({c.train.beta1, c.train.beta2})
                                                        .weight_decay(c.train.weight_decay))),
       torch::optim::OptimizerParamGroup(no_decay, std::make_unique<torch::optim::AdamWOptions>(
                                                       torch::optim::AdamWOptions(c.train.lr)
                                                           .betas({c.train.beta1, c.train.beta2})
                                                           .weight_decay(0.0)))});

  distributed::ProcessGroups groups;
  std::unique_ptr<distributed::GradientAllReduce> grad_sync;
  if (world > 1) {
    groups = distributed::make_process_groups(*launch, /*sequence_size=*/1, device.type());
    grad_sync = std::make_unique<distributed::GradientAllReduce>(model->parameters(), groups.world);
  }

  const fs::path run_dir = rank == 0 ? fresh_run_dir(c.run) : fs::path();
  if (rank == 0) write_file_atomic(run_dir / "config.toml", to_toml(c));
  MetricsLog metrics(rank == 0 ? run_dir / "metrics.jsonl" : fs::path());
  const auto validation = corpus.validation_windows(c.eval.batches * c.train.batch_size);
  const double unigram_bpb = corpus.unigram_bits_per_byte();
  const int64_t params = model->num_parameters();
  log::info("run folder " + run_dir.string() + " | device " + device.str() + " | " + std::to_string(params) +
            " parameters | corpus " + std::to_string(corpus.train_bytes()) + " train / " +
            std::to_string(corpus.validation_bytes()) + " validation bytes | attention backend " +
            attention::to_string(c.attention.dilated.backend));
  for (const auto& w : c.attention.dilated.coverage_warnings(c.model.heads)) log::warn("attention: " + w);

  const double initial_val = rank == 0 ? evaluate(model, validation, c.train.batch_size, device) : 0.0;
  if (rank == 0) log::info("step 0: validation loss " + std::to_string(initial_val) + " nats/byte (unigram baseline " +
            std::to_string(unigram_bpb) + " bits/byte)");
  metrics.write({{"step", 0}, {"val_loss", initial_val}, {"val_bits_per_byte", initial_val / std::log(2.0)}});

  const int64_t tokens_per_step = c.train.batch_size * c.train.grad_accumulation * c.data.sequence_length * world;
  const auto start = std::chrono::steady_clock::now();
  auto window_start = start;
  double train_loss = 0, val_loss = initial_val, window_loss = 0;
  int64_t window_steps = 0;
  for (int64_t step = 0; step < c.train.steps; ++step) {
    const double lr = learning_rate(c.train, step);
    for (auto& group : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
    optimizer.zero_grad();
    double step_loss = 0;
    for (int64_t micro = 0; micro < c.train.grad_accumulation; ++micro) {
      const auto batch = corpus.sample_train(c.train.batch_size, rng).to(device);
      torch::Tensor loss;
      if (c.train.precision == "bf16") {
        at::autocast::set_autocast_enabled(at::kCUDA, true);
        at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
        loss = lm_loss(model, batch);
        at::autocast::set_autocast_enabled(at::kCUDA, false);
        at::autocast::clear_cache();
      } else {
        loss = lm_loss(model, batch);
      }
      if (grad_sync && micro + 1 == c.train.grad_accumulation) grad_sync->arm();  // the last backward all-reduces
      (loss / static_cast<double>(c.train.grad_accumulation)).backward();
      step_loss += loss.item<double>() / static_cast<double>(c.train.grad_accumulation);
    }
    if (grad_sync) {  // gradients averaged over the ranks; the logged loss too
      grad_sync->finish();
      auto total = torch::tensor({step_loss}, torch::dtype(torch::kDouble).device(device));
      groups.world.all_reduce(total);
      step_loss = total.item<double>() / static_cast<double>(world);
    }
    if (!std::isfinite(step_loss)) {
      throw Error("training diverged: loss is " + std::to_string(step_loss) + " at step " + std::to_string(step + 1));
    }
    const double grad_norm =
        c.train.grad_clip > 0 ? torch::nn::utils::clip_grad_norm_(model->parameters(), c.train.grad_clip) : 0.0;
    optimizer.step();
    train_loss = step_loss;
    window_loss += step_loss;
    ++window_steps;

    const int64_t done = step + 1;
    if (done % c.train.log_every == 0 || done == c.train.steps) {
      const auto now = std::chrono::steady_clock::now();
      const double window_s = std::chrono::duration<double>(now - window_start).count();
      const double elapsed = std::chrono::duration<double>(now - start).count();
      const double tok_s = static_cast<double>(tokens_per_step * window_steps) / window_s;
      const double eta = elapsed / static_cast<double>(done) * static_cast<double>(c.train.steps - done);
      std::ostringstream line;
      line.precision(4);
      line << "step " << done << "/" << c.train.steps << " | loss " << window_loss / window_steps << " | lr " << lr
           << " | grad norm " << grad_norm << " | " << static_cast<int64_t>(tok_s) << " tok/s | ETA "
           << format_duration(eta);
      log::info(line.str());
      metrics.write({{"step", done}, {"train_loss", window_loss / window_steps}, {"lr", lr},
                     {"grad_norm", grad_norm}, {"tokens_per_s", tok_s}, {"elapsed_s", elapsed}});
      window_start = now;
      window_loss = 0;
      window_steps = 0;
    }
    const bool last = done == c.train.steps;
    if (rank == 0 && ((c.eval.every > 0 && done % c.eval.every == 0) || last)) {
      val_loss = evaluate(model, validation, c.train.batch_size, device);
      log::info("step " + std::to_string(done) + ": validation loss " + std::to_string(val_loss) + " nats/byte = " +
                std::to_string(val_loss / std::log(2.0)) + " bits/byte");
      metrics.write({{"step", done}, {"val_loss", val_loss}, {"val_bits_per_byte", val_loss / std::log(2.0)}});
    }
    if (rank == 0 && ((c.train.checkpoint_every > 0 && done % c.train.checkpoint_every == 0) || last)) {
      save_checkpoint(model, optimizer, done, run_dir / "checkpoints", c.train.keep_checkpoints);
    }
  }

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const json summary = {
      {"task", "lm"},
      {"steps", c.train.steps},
      {"tokens", tokens_per_step * c.train.steps},
      {"parameters", params},
      {"train_seconds", seconds},
      {"final_train_loss", train_loss},
      {"initial_val_bits_per_byte", initial_val / std::log(2.0)},
      {"final_val_bits_per_byte", val_loss / std::log(2.0)},
      {"unigram_bits_per_byte", unigram_bpb},
      {"device", device.str()},
  };
  if (rank != 0) return run_dir;
  write_file_atomic(run_dir / "summary.json", summary.dump(2) + "\n");
  log::info("done in " + format_duration(seconds) + ": validation " + std::to_string(val_loss / std::log(2.0)) +
            " bits/byte (started at " + std::to_string(initial_val / std::log(2.0)) +
            "; a unigram model of the training bytes gets " + std::to_string(unigram_bpb) + ")");
  log::info("wrote " + (run_dir / "summary.json").string());
  return run_dir;
}

}  // namespace

fs::path run_experiment(const ExperimentConfig& config) {
  if (config.run.task == "lm") return train_language_model(config);
  throw ConfigError("run.task \"" + config.run.task + "\" has no runner");
}

}  // namespace longnet::pipelines
