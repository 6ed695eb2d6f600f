// What the training runners of `longnet run` share (pipelines/run.cpp for the language model,
// pipelines/multimodal_run.cpp for the multimodal model): device choice, run folders, the AdamW optimizer and its
// schedule, checkpoints that a resumed run continues from exactly, metrics logs and progress lines.
//
// Checkpoints: checkpoints/step_<8 digits>.pt, a torch archive holding the model ("model"), any extra modules
// ("extra_<i>"), the optimizer, the step, the CPU random generator's state and a JSON object for the runner's own
// state (the data loader's position, ...). Written atomically (temporary file, fsync, rename, fsync of the folder),
// so a kill at any moment leaves only complete checkpoints; the newest `keep` are kept.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Event.h>
#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include "core/tensorboard.h"
#include "pipelines/experiment_config.h"

namespace longnet::pipelines {

// "cpu" or "cuda" as run.device asks; ConfigError when it asks for a GPU that is not there.
c10::Device choose_device(const RunConfig& run);

// <output_dir>/<name>, or <name>-2, -3, ... when earlier runs exist (a new run never overwrites an old one), with its
// checkpoints/ folder created. IoError when it cannot be created.
std::filesystem::path fresh_run_dir(const RunConfig& run);

std::string format_duration(double seconds);  // "1h2m3s"

// Linear warmup to train.lr, then cosine decay to lr · min_lr_ratio at the last step.
double learning_rate(const TrainConfig& train, int64_t step);

// AdamW with weight decay on matrices only (biases, norms and embeddings' scalars are not decayed). Its step runs
// torch's fused multi-tensor AdamW kernel where it applies (same update, state and checkpoints as torch::optim::AdamW,
// a few launches per step instead of about ten per parameter).
std::unique_ptr<torch::optim::AdamW> make_adamw(const std::vector<at::Tensor>& parameters, const TrainConfig& train);

// torch::nn::utils::clip_grad_norm_ (2-norm): the gradients' total norm, and every gradient scaled by
// min(1, max_norm / (norm + 1e-6)); multi-tensor kernels instead of one norm and one scale launch per parameter.
// Returns the norm before clipping.
double clip_grad_norm(const std::vector<at::Tensor>& parameters, double max_norm);
// The same without reading the norm back: the clipping is queued and the norm returned as a 0-dim float tensor on
// the gradients' device (undefined when no parameter has a gradient).
at::Tensor clip_grad_norm_queued(const std::vector<at::Tensor>& parameters, double max_norm);

// A step's loss (a 0-dim tensor) and gradient norm in one read from the device, one wait instead of two. With
// max_norm > 0 the gradients are clipped first, queued before the loss is known, so that the host prepares the
// clipping while the device finishes the backward. A step whose loss is not finite applies no update (StepFailures),
// so clipping its gradients changes nothing; its norm reads 0, as when clipping waited for a finite loss.
struct StepValues {
  double loss = 0, grad_norm = 0;
};
StepValues read_loss_and_clip(const at::Tensor& loss, const std::vector<at::Tensor>& parameters, double max_norm);

class FusedAdamW;  // make_adamw's optimizer

// A step queued without reading its loss first, so that the host never waits for the device between steps: the
// device itself skips the update of a step whose loss (or, with clipping, gradient norm) is not finite, and the host
// collects the values one step later, once the device has long computed them, for StepFailures and the logs. A
// skipped step changes no parameter, moment or step count, as if it had not been applied; read_loss_and_clip followed
// by optimizer.step() or not gives the same parameters. Needs make_adamw's optimizer (supported).
class DeferredStep {
 public:
  static bool supported(const torch::optim::AdamW& optimizer);
  // Clips (max_norm > 0), then queues the update at the optimizer's learning rate, skipped on the device when the
  // step is not finite. The previous step must have been collected.
  void queue(const at::Tensor& loss, const std::vector<at::Tensor>& parameters, double max_norm,
             torch::optim::AdamW& optimizer);
  // The queued step's loss and gradient norm as read_loss_and_clip gives them, waiting for that step's values only.
  // A step that was not finite has its step counts taken back, so collect it before the next step or a checkpoint.
  StepValues collect();

 private:
  bool queued_ = false;
  at::Tensor host_;                          // the values, on the host (pinned: copied there without waiting)
  c10::Event ready_{c10::DeviceType::CUDA};  // the copy is done
  FusedAdamW* optimizer_ = nullptr;
};

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr);

// Modules whose parameters a checkpoint holds: the model first, then extras (e.g. a learned temperature).
struct CheckpointModules {
  torch::nn::Module* model = nullptr;
  std::vector<torch::nn::Module*> extras;
};

// Writes checkpoints/step_<step>.pt in `run_dir` and keeps the newest `keep`. `state` is the runner's own state.
void save_checkpoint(const std::filesystem::path& run_dir, int64_t step, const CheckpointModules& modules,
                     torch::optim::Optimizer& optimizer, const nlohmann::json& state, int64_t keep);

// The newest checkpoint of a run folder, if any.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& run_dir);

struct LoadedCheckpoint {
  std::filesystem::path file;
  int64_t step = 0;
  nlohmann::json state;
};

// Restores modules, optimizer (when given) and the CPU random generator from `file`. DataError naming the file when
// it is not a checkpoint of these modules.
LoadedCheckpoint load_checkpoint(const std::filesystem::path& file, const CheckpointModules& modules,
                                 torch::optim::Optimizer* optimizer);

// `--resume`: where a run continues. Restores the newest checkpoint of `run_dir` into the modules and optimizer; a
// folder without a checkpoint yet starts over at step 0. `log_step` is what MetricsLog/RunLogger keep records up to
// (-1: none); it is empty for a new run (`run_dir` empty). `state` is the checkpoint's runner state (null without one).
struct ResumePoint {
  int64_t first_step = 0;
  std::optional<int64_t> log_step;
  nlohmann::json state;
};
ResumePoint resume_point(const std::filesystem::path& run_dir, const CheckpointModules& modules,
                         torch::optim::Optimizer& optimizer);

// metrics.jsonl: one JSON object a line, flushed as written. Opened on a resumed run, records after the checkpoint's
// step are dropped first (they belong to the part of the interrupted run that is being redone). An empty path (a rank
// other than 0) writes nothing.
class MetricsLog {
 public:
  explicit MetricsLog(const std::filesystem::path& path, std::optional<int64_t> resume_step = std::nullopt);
  void write(const nlohmann::json& record);

 private:
  std::ofstream out_;
};

// A run's scalar logs: metrics.jsonl and TensorBoard event files (<run_dir>/tensorboard). Every numeric field of a
// record other than "step" becomes the scalar "<prefix>/<field>".
class RunLogger {
 public:
  RunLogger(const std::filesystem::path& run_dir, std::optional<int64_t> resume_step);
  void log(const std::string& prefix, int64_t step, const nlohmann::json& fields);

 private:
  MetricsLog metrics_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
};

// "step 40/300 [=====>     ] 13% | loss 2.31 | ... | ETA 1m20s": elapsed time and ETA from the steps done in this
// process (a resumed run does not count the time before it).
class ProgressLine {
 public:
  ProgressLine(int64_t first_step, int64_t total_steps);
  std::string format(int64_t done, const std::string& fields) const;
  double elapsed_seconds() const;

 private:
  int64_t first_step_, total_steps_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

// Profiles train.profile_steps steps from train.profile_from (1-based; 0: off) with torch's Kineto profiler and writes
// <run_dir>/profile/trace.json (Chrome trace, open in Perfetto or chrome://tracing) and profile/summary.txt: the GPU
// kernels (on a CUDA run) or the operators (on the CPU; inclusive times) that took the most time, with their share.
class StepProfiler {
 public:
  StepProfiler(const TrainConfig& train, std::filesystem::path run_dir, bool cuda);
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;
  void before_step(int64_t step);  // 0-based step about to run
  void after_step(int64_t step);

 private:
  int64_t first_ = 0, count_ = 0;
  std::filesystem::path dir_;
  bool cuda_ = false, active_ = false;
  std::chrono::steady_clock::time_point start_;
};

// The failure policy of a step. A non-finite loss or gradient norm stops the run unless train.skip_nonfinite; an
// out-of-memory error in the forward or backward stops it unless train.skip_oom. A skipped step applies no update (its
// gradients are dropped) and is counted; more than train.max_skipped_steps in a row stop the run anyway.
class StepFailures {
 public:
  explicit StepFailures(const TrainConfig& train) : train_(train) {}
  // Whether the step's update may be applied; throws Error when the policy says stop.
  bool accept(int64_t step, double loss, double grad_norm);
  // Called with an out-of-memory error caught during the step; rethrows it unless the policy skips.
  void out_of_memory(int64_t step, const std::exception& error);
  int64_t skipped_nonfinite() const { return nonfinite_; }
  int64_t skipped_oom() const { return oom_; }

 private:
  void skipped(int64_t step, const std::string& why);
  const TrainConfig& train_;
  int64_t nonfinite_ = 0, oom_ = 0, in_a_row_ = 0;
};

// Whether `step` (0-based) is one of the 1-based steps of a fault-injection list.
bool injected_at(const std::vector<int64_t>& steps, int64_t step);
[[noreturn]] void throw_injected_oom(int64_t step);

// bf16 autocast on CUDA for the lifetime of the guard (precision = "bf16"); nothing otherwise.
class AutocastGuard {
 public:
  explicit AutocastGuard(bool enabled);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool enabled_;
};

}  // namespace longnet::pipelines
