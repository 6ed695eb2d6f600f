#include "pipelines/training.h"

#include <algorithm>
#include <map>
#include <optional>
#include <cmath>
#include <cstdio>
#include <sstream>

#include <ATen/autocast_mode.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"

namespace longnet::pipelines {
namespace fs = std::filesystem;
using nlohmann::json;

c10::Device choose_device(const RunConfig& run) {
  const bool cuda = torch::cuda::is_available();
  if (run.device == "cuda" && !cuda) {
    throw ConfigError("run.device = \"cuda\" but no CUDA device is visible to torch");
  }
  return (run.device == "cuda" || (run.device == "auto" && cuda)) ? c10::Device(c10::kCUDA) : c10::Device(c10::kCPU);
}

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

double learning_rate(const TrainConfig& t, int64_t step) {
  if (step < t.warmup_steps) return t.lr * static_cast<double>(step + 1) / static_cast<double>(t.warmup_steps);
  const double span = std::max<int64_t>(1, t.steps - t.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - t.warmup_steps) / span);
  const double floor = t.lr * t.min_lr_ratio;
  return floor + 0.5 * (t.lr - floor) * (1.0 + std::cos(M_PI * progress));
}

// torch's AdamW whose step runs the fused multi-tensor kernel (at::_fused_adamw_: a few launches per parameter group
// instead of about ten per parameter; on a GPU the per-parameter loop was launch-bound). The state, its
// serialisation and the update rule are AdamW's: decoupled weight decay p ← p·(1 − lr·λ), bias-corrected moments.
// Groups the kernel cannot take (amsgrad, sparse or non-contiguous gradients, parameters spread over devices or
// dtypes) run torch's per-parameter step instead.
class FusedAdamW final : public torch::optim::AdamW {
 public:
  using AdamW::AdamW;

  torch::Tensor step(LossClosure closure = nullptr) override {
    if (!fusable()) return AdamW::step(std::move(closure));
    const torch::NoGradGuard no_grad;
    torch::Tensor loss;
    if (closure != nullptr) {
      const at::AutoGradMode enable_grad(true);
      loss = closure();
    }
    update(std::nullopt);
    return loss;
  }

  // step() unless `found_inf` (a float32 scalar on the parameters' device) is nonzero, decided on the device: the
  // host queues the update without reading it. undo_skipped_step() then takes back the step counts, which live on the
  // host. Where the fused kernel does not apply, the host reads found_inf and steps or not.
  void step_unless(const at::Tensor& found_inf) {
    counted_.clear();
    if (!fusable()) {
      if (found_inf.item<float>() == 0.f) AdamW::step();
      return;
    }
    const torch::NoGradGuard no_grad;
    update(found_inf);
  }

  // The last step_unless() was skipped on the device: its parameters' step counts go back to what they were.
  void undo_skipped_step() {
    for (auto* st : counted_) st->step(st->step() - 1);
    counted_.clear();
  }

 private:
  void update(const std::optional<at::Tensor>& found_inf) {
    counted_.clear();
    for (auto& group : param_groups_) {
      const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
      // The kernel reads one step count per parameter; parameters that missed steps (no gradient) have their own.
      std::map<int64_t, Lists> by_step;
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        auto& slot = state_[p.unsafeGetTensorImpl()];
        if (!slot) {
          auto fresh = std::make_unique<torch::optim::AdamWParamState>();
          fresh->exp_avg(torch::zeros_like(p, at::MemoryFormat::Preserve));
          fresh->exp_avg_sq(torch::zeros_like(p, at::MemoryFormat::Preserve));
          slot = std::move(fresh);
        }
        auto& st = static_cast<torch::optim::AdamWParamState&>(*slot);
        st.step(st.step() + 1);
        counted_.push_back(&st);
        Lists& l = by_step[st.step()];
        l.params.push_back(p);
        l.grads.push_back(p.grad());
        l.exp_avgs.push_back(st.exp_avg());
        l.exp_avg_sqs.push_back(st.exp_avg_sq());
      }
      for (auto& [count, l] : by_step) {
        const auto step_t = torch::full({}, static_cast<double>(count), l.params.front().options().dtype(at::kFloat));
        const std::vector<at::Tensor> steps(l.params.size(), step_t);
        at::_fused_adamw_(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, {}, steps, o.lr(), std::get<0>(o.betas()),
                          std::get<1>(o.betas()), o.weight_decay(), o.eps(), /*amsgrad=*/false, /*maximize=*/false,
                          /*grad_scale=*/std::nullopt, found_inf);
      }
    }
  }

  struct Lists {
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs;
  };
  std::vector<torch::optim::AdamWParamState*> counted_;  // whose step counts the last update raised

  bool fusable() const {
    std::optional<at::Device> device;
    std::optional<at::ScalarType> dtype;
    for (const auto& group : param_groups_) {
      if (static_cast<const torch::optim::AdamWOptions&>(group.options()).amsgrad()) return false;
      for (const auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        const auto& g = p.grad();
        if (g.is_sparse() || !p.is_contiguous() || !g.is_contiguous() || g.scalar_type() != p.scalar_type() ||
            g.device() != p.device() || !at::isFloatingType(p.scalar_type())) {
          return false;
        }
        if (device.value_or(p.device()) != p.device() || dtype.value_or(p.scalar_type()) != p.scalar_type()) {
          return false;
        }
        device = p.device();
        dtype = p.scalar_type();
      }
    }
    return true;
  }
};

std::unique_ptr<torch::optim::AdamW> make_adamw(const std::vector<at::Tensor>& parameters, const TrainConfig& t) {
  std::vector<at::Tensor> decay, no_decay;
  for (const auto& p : parameters) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  auto options = [&](double weight_decay) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(t.lr).betas({t.beta1, t.beta2}).weight_decay(weight_decay));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, options(t.weight_decay));
  groups.emplace_back(no_decay, options(0.0));
  return std::make_unique<FusedAdamW>(std::move(groups));
}

at::Tensor clip_grad_norm_queued(const std::vector<at::Tensor>& parameters, double max_norm) {
  const torch::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (const auto& p : parameters) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (grads.empty()) return {};
  const auto norms = at::_foreach_norm(grads, 2);
  const auto total = norms.size() == 1 ? norms.front() : at::stack(norms).norm(2);
  const auto coef = torch::clamp(max_norm / (total + 1e-6), std::nullopt, 1.0);
  at::_foreach_mul_(grads, coef);
  return total;
}

double clip_grad_norm(const std::vector<at::Tensor>& parameters, double max_norm) {
  const at::Tensor total = clip_grad_norm_queued(parameters, max_norm);
  return total.defined() ? total.item<double>() : 0.0;
}

namespace {

// A step's loss and, with max_norm > 0, its gradient norm after queueing the clipping: (1) or (2) float64 on the
// loss's device, nothing read yet.
at::Tensor queue_step_values(const at::Tensor& loss, const std::vector<at::Tensor>& parameters, double max_norm) {
  const at::Tensor norm = max_norm > 0 ? clip_grad_norm_queued(parameters, max_norm) : at::Tensor();
  at::Tensor values = loss.detach().reshape({1}).to(at::kDouble);
  if (norm.defined()) values = at::cat({values, norm.detach().reshape({1}).to(values.options())});
  return values;
}

// queue_step_values' tensor, on the host, as StepValues: a non-finite loss reads a norm of 0.
StepValues step_values(const at::Tensor& host) {
  const auto v = host.accessor<double, 1>();
  StepValues out{v[0], 0.0};
  if (host.size(0) > 1 && std::isfinite(out.loss)) out.grad_norm = v[1];
  return out;
}

}  // namespace

StepValues read_loss_and_clip(const at::Tensor& loss, const std::vector<at::Tensor>& parameters, double max_norm) {
  return step_values(queue_step_values(loss, parameters, max_norm).cpu());
}

bool DeferredStep::supported(const torch::optim::AdamW& optimizer) {
  return dynamic_cast<const FusedAdamW*>(&optimizer) != nullptr;
}

void DeferredStep::queue(const at::Tensor& loss, const std::vector<at::Tensor>& parameters, double max_norm,
                         torch::optim::AdamW& optimizer) {
  if (queued_) throw Error("DeferredStep: the previous step was not collected");
  auto* fused = dynamic_cast<FusedAdamW*>(&optimizer);
  if (fused == nullptr) throw Error("DeferredStep: the optimizer is not make_adamw's");
  const torch::NoGradGuard no_grad;
  const at::Tensor values = queue_step_values(loss, parameters, max_norm);
  // The step is not finite when its loss or (with clipping) its gradient norm is not: the update is skipped.
  const auto found_inf = values.isfinite().all().logical_not().to(at::kFloat);
  fused->step_unless(found_inf);
  if (values.is_cuda()) {
    host_ = at::empty({values.size(0)}, values.options().device(at::kCPU).pinned_memory(true));
    host_.copy_(values, /*non_blocking=*/true);
    ready_.record(c10::cuda::getCurrentCUDAStream(values.get_device()).unwrap());
  } else {
    host_ = values;
  }
  queued_ = true;
  optimizer_ = fused;
}

StepValues DeferredStep::collect() {
  if (!queued_) throw Error("DeferredStep: no step is queued");
  queued_ = false;
  if (host_.is_pinned()) ready_.synchronize();
  const StepValues out = step_values(host_);
  if (!std::isfinite(out.loss) || !std::isfinite(out.grad_norm)) optimizer_->undo_skipped_step();
  return out;
}

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

namespace {

std::string checkpoint_name(int64_t step) {
  char name[40];
  std::snprintf(name, sizeof(name), "step_%08lld.pt", static_cast<long long>(step));
  return name;
}

std::vector<fs::path> checkpoints_of(const fs::path& run_dir) {
  std::vector<fs::path> all;
  const fs::path dir = run_dir / "checkpoints";
  if (!fs::is_directory(dir)) return all;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto name = e.path().filename().string();
    if (name.rfind("step_", 0) == 0 && e.path().extension() == ".pt") all.push_back(e.path());
  }
  std::sort(all.begin(), all.end());  // names sort by step
  return all;
}

}  // namespace

void save_checkpoint(const fs::path& run_dir, int64_t step, const CheckpointModules& modules,
                     torch::optim::Optimizer& optimizer, const json& state, int64_t keep) {
  torch::serialize::OutputArchive archive;
  torch::serialize::OutputArchive model;
  modules.model->save(model);
  archive.write("model", model);
  for (size_t i = 0; i < modules.extras.size(); ++i) {
    torch::serialize::OutputArchive extra;
    modules.extras[i]->save(extra);
    archive.write("extra_" + std::to_string(i), extra);
  }
  torch::serialize::OutputArchive optim;
  optimizer.save(optim);
  archive.write("optimizer", optim);
  archive.write("step", torch::tensor(step));
  archive.write("rng", at::detail::getDefaultCPUGenerator().get_state());
  const std::string text = state.dump();
  archive.write("state", torch::tensor(std::vector<uint8_t>(text.begin(), text.end()), torch::kUInt8));
  std::ostringstream bytes;
  archive.save_to(bytes);
  write_file_atomic(run_dir / "checkpoints" / checkpoint_name(step), bytes.str());
  const auto all = checkpoints_of(run_dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) fs::remove(all[i]);
}

std::optional<fs::path> latest_checkpoint(const fs::path& run_dir) {
  const auto all = checkpoints_of(run_dir);
  if (all.empty()) return std::nullopt;
  return all.back();
}

LoadedCheckpoint load_checkpoint(const fs::path& file, const CheckpointModules& modules,
                                 torch::optim::Optimizer* optimizer) {
  LoadedCheckpoint out;
  out.file = file;
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(file.string());
    torch::serialize::InputArchive model;
    archive.read("model", model);
    modules.model->load(model);
    for (size_t i = 0; i < modules.extras.size(); ++i) {
      torch::serialize::InputArchive extra;
      archive.read("extra_" + std::to_string(i), extra);
      modules.extras[i]->load(extra);
    }
    if (optimizer != nullptr) {
      torch::serialize::InputArchive optim;
      archive.read("optimizer", optim);
      optimizer->load(optim);
    }
    at::Tensor step, rng, state;
    archive.read("step", step);
    archive.read("rng", rng);
    archive.read("state", state);
    out.step = step.item<int64_t>();
    auto generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(rng);
    const auto* p = state.data_ptr<uint8_t>();
    out.state = json::parse(std::string(p, p + state.numel()));
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw DataError("checkpoint '" + file.string() + "' cannot be loaded into this model: " + e.what());
  }
  return out;
}

ResumePoint resume_point(const fs::path& run_dir, const CheckpointModules& modules,
                         torch::optim::Optimizer& optimizer) {
  ResumePoint r;
  if (run_dir.empty()) return r;
  r.log_step = -1;  // killed before its first checkpoint: start over in the same folder
  if (const auto file = latest_checkpoint(run_dir)) {
    auto loaded = load_checkpoint(*file, modules, &optimizer);
    r.first_step = loaded.step;
    r.log_step = loaded.step;
    r.state = std::move(loaded.state);
    log::info("resuming " + run_dir.string() + " from " + file->filename().string());
  } else {
    log::warn("resume: " + run_dir.string() + " has no checkpoint; training starts over in it");
  }
  return r;
}

MetricsLog::MetricsLog(const fs::path& path, std::optional<int64_t> resume_step) {
  if (path.empty()) return;
  if (resume_step && fs::exists(path)) {
    // Keep the records up to the checkpoint; a torn last line of a killed run is dropped too.
    std::ifstream in(path);
    std::string line, kept;
    while (std::getline(in, line)) {
      const auto record = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (record.is_object() && record.value("step", int64_t{0}) <= *resume_step) kept += line + "\n";
    }
    write_file_atomic(path, kept);
  }
  out_.open(path, std::ios::app);
  if (!out_) throw IoError("cannot open '" + path.string() + "' for writing");
}

void MetricsLog::write(const json& record) {
  if (!out_.is_open()) return;
  out_ << record.dump() << "\n";
  out_.flush();
  if (!out_) throw IoError("cannot write metrics (disk full?)");
}

RunLogger::RunLogger(const fs::path& run_dir, std::optional<int64_t> resume_step)
    : metrics_(run_dir.empty() ? fs::path() : run_dir / "metrics.jsonl", resume_step) {
  if (run_dir.empty()) return;
  tensorboard_ = std::make_unique<TensorBoardWriter>(run_dir / "tensorboard");
  if (resume_step) tensorboard_->add_session_start(*resume_step + 1);
}

void RunLogger::log(const std::string& prefix, int64_t step, const json& fields) {
  json record = {{"step", step}};
  if (!prefix.empty()) record["kind"] = prefix;
  for (const auto& [key, value] : fields.items()) record[key] = value;
  metrics_.write(record);
  if (!tensorboard_) return;
  for (const auto& [key, value] : fields.items()) {
    if (value.is_number()) tensorboard_->add_scalar(prefix + "/" + key, value.get<double>(), step);
  }
  tensorboard_->flush();
}

ProgressLine::ProgressLine(int64_t first_step, int64_t total_steps)
    : first_step_(first_step), total_steps_(total_steps) {}

double ProgressLine::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string ProgressLine::format(int64_t done, const std::string& fields) const {
  const double elapsed = elapsed_seconds();
  const int64_t here = std::max<int64_t>(1, done - first_step_);
  const double eta = elapsed / static_cast<double>(here) * static_cast<double>(total_steps_ - done);
  constexpr int kWidth = 20;
  const auto filled = static_cast<int>(kWidth * done / std::max<int64_t>(1, total_steps_));
  std::string bar(static_cast<size_t>(filled), '=');
  if (filled < kWidth) bar += '>' + std::string(static_cast<size_t>(kWidth - filled - 1), ' ');
  return "step " + std::to_string(done) + "/" + std::to_string(total_steps_) + " [" + bar + "] " +
         std::to_string(100 * done / std::max<int64_t>(1, total_steps_)) + "% | " + fields + " | ETA " +
         format_duration(eta);
}

StepProfiler::StepProfiler(const TrainConfig& train, fs::path run_dir, bool cuda)
    : first_(train.profile_from),
      count_(train.profile_steps),
      dir_(run_dir.empty() ? fs::path() : run_dir / "profile"),  // empty: a rank that writes nothing
      cuda_(cuda) {}

StepProfiler::~StepProfiler() {
  if (active_) torch::autograd::profiler::disableProfiler();  // an exception left a window open
}

void StepProfiler::before_step(int64_t step) {
  if (first_ == 0 || dir_.empty() || step + 1 != first_) return;
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  std::set<ActivityType> activities{ActivityType::CPU};
  if (cuda_) activities.insert(ActivityType::CUDA);
  if (cuda_) torch::cuda::synchronize();
  torch::autograd::profiler::prepareProfiler(config, activities);
  torch::autograd::profiler::enableProfiler(config, activities);
  active_ = true;
  start_ = std::chrono::steady_clock::now();
  log::info("profiling steps " + std::to_string(first_) + " to " + std::to_string(first_ + count_ - 1));
}

void StepProfiler::after_step(int64_t step) {
  if (!active_ || step + 1 != first_ + count_ - 1) return;
  if (cuda_) torch::cuda::synchronize();
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
  auto result = torch::autograd::profiler::disableProfiler();
  active_ = false;
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) throw IoError("cannot create '" + dir_.string() + "': " + ec.message());
  result->save((dir_ / "trace.json").string());
  // GPU kernels (and copies) on a CUDA run; CPU operators otherwise (nested, so their times overlap).
  std::map<std::string, std::pair<double, int64_t>> by_name;  // name -> (ms, calls)
  double total_ms = 0;
  for (const auto& e : result->events()) {
    const bool device = e.deviceType() == c10::DeviceType::CUDA;
    if (device != cuda_ || e.isHiddenEvent()) continue;
    const double ms = static_cast<double>(e.durationNs()) / 1e6;
    auto& slot = by_name[e.name().substr(0, 140)];
    slot.first += ms;
    slot.second += 1;
    total_ms += ms;
  }
  std::vector<std::pair<std::string, std::pair<double, int64_t>>> rows(by_name.begin(), by_name.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof(line), "%lld steps, %.1f ms wall; %s time %.1f ms (%.0f%% of wall)\n\n",
                static_cast<long long>(count_), wall_ms, cuda_ ? "GPU kernel" : "operator (inclusive)", total_ms,
                100 * total_ms / std::max(wall_ms, 1e-9));
  out << line << "      ms   share   calls  name\n";
  for (size_t i = 0; i < std::min<size_t>(rows.size(), 60); ++i) {
    const auto& [name, v] = rows[i];
    std::snprintf(line, sizeof(line), "%8.2f  %5.1f%%  %6lld  ", v.first, 100 * v.first / std::max(total_ms, 1e-9),
                  static_cast<long long>(v.second));
    out << line << name << "\n";
  }
  write_file_atomic(dir_ / "summary.txt", out.str());
  log::info("profile: " + (dir_ / "summary.txt").string() + " and trace.json");
}

void StepFailures::skipped(int64_t step, const std::string& why) {
  ++in_a_row_;
  log::warn("step " + std::to_string(step + 1) + " skipped: " + why + " (" + std::to_string(nonfinite_) +
            " non-finite and " + std::to_string(oom_) + " out-of-memory steps skipped so far)");
  if (in_a_row_ > train_.max_skipped_steps) {
    throw Error("training stopped: " + std::to_string(in_a_row_) + " steps in a row were skipped (train.max_skipped_steps = " +
                std::to_string(train_.max_skipped_steps) + "); the last: " + why);
  }
}

bool StepFailures::accept(int64_t step, double loss, double grad_norm) {
  if (std::isfinite(loss) && std::isfinite(grad_norm)) {
    in_a_row_ = 0;
    return true;
  }
  const std::string what = !std::isfinite(loss) ? "loss is " + std::to_string(loss)
                                                 : "gradient norm is " + std::to_string(grad_norm);
  if (!train_.skip_nonfinite) {
    throw Error("training diverged: " + what + " at step " + std::to_string(step + 1) +
                " (train.skip_nonfinite = true skips such steps)");
  }
  ++nonfinite_;
  skipped(step, what);
  return false;
}

void StepFailures::out_of_memory(int64_t step, const std::exception& error) {
  if (!train_.skip_oom) throw;
  ++oom_;
  const std::string what = error.what();
  skipped(step, "out of memory: " + what.substr(0, what.find('\n')));  // c10 messages carry a location after a newline
}

bool injected_at(const std::vector<int64_t>& steps, int64_t step) {
  return std::find(steps.begin(), steps.end(), step + 1) != steps.end();
}

void throw_injected_oom(int64_t step) {
  throw c10::OutOfMemoryError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                              "injected out-of-memory error at step " + std::to_string(step + 1));
}

AutocastGuard::AutocastGuard(bool enabled) : enabled_(enabled) {
  if (!enabled_) return;
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
}

AutocastGuard::~AutocastGuard() {
  if (!enabled_) return;
  at::autocast::set_autocast_enabled(at::kCUDA, false);
  at::autocast::clear_cache();
}

}  // namespace longnet::pipelines
