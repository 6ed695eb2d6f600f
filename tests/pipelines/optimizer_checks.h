// Checks shared by the CPU and GPU tests of pipelines/training.h's optimizer and clipping: each compares the fast
// path against torch's own per-parameter implementation on the same parameters and gradients (the one-read step values
// against the separate calls).
#pragma once

#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

#include <torch/torch.h>

#include "pipelines/training.h"

#include <catch2/catch.hpp>

namespace longnet::test {

inline double max_relative_difference(const at::Tensor& a, const at::Tensor& b) {
  const auto a64 = a.detach().to(at::kCPU, at::kDouble), b64 = b.detach().to(at::kCPU, at::kDouble);
  return ((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-30)).item<double>();
}

// Parameters shaped like a model's (matrices, decayed; vectors, not) and seeded gradients for step `step`. The last
// parameter gets no gradient on odd steps, so its step count falls behind the others'.
inline std::vector<at::Tensor> make_parameters(const at::Device& device) {
  torch::manual_seed(11);
  const auto opts = torch::TensorOptions().device(device).dtype(torch::kFloat);
  return {torch::randn({16, 8}, opts).requires_grad_(), torch::randn({8}, opts).requires_grad_(),
          torch::randn({3, 4, 5}, opts).requires_grad_(), torch::randn({5}, opts).requires_grad_()};
}

inline void set_gradients(std::vector<at::Tensor>& params, int step) {
  torch::manual_seed(100 + step);
  for (size_t i = 0; i < params.size(); ++i) {
    auto g = torch::randn(params[i].sizes(), torch::dtype(torch::kFloat)) * (1.0 + static_cast<double>(i));
    if (i + 1 == params.size() && step % 2 == 1) {
      params[i].mutable_grad() = at::Tensor();
    } else {
      params[i].mutable_grad() = g.to(params[i].device());
    }
  }
}

// make_adamw's optimizer (fused where it applies) against torch::optim::AdamW with the same groups, over steps with
// a changing learning rate and a parameter that skips steps; then a checkpoint of the fused optimizer restored into
// torch's continues identically.
inline void check_fused_adamw_matches_torch(const at::Device& device) {
  pipelines::TrainConfig train;
  train.lr = 1e-2;
  train.weight_decay = 0.1;
  auto ours = make_parameters(device), theirs = make_parameters(device);
  auto fused = pipelines::make_adamw(ours, train);
  std::vector<at::Tensor> decay{theirs[0], theirs[2]}, no_decay{theirs[1], theirs[3]};
  auto options = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(train.lr).betas({train.beta1, train.beta2}).weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, options(train.weight_decay));
  groups.emplace_back(no_decay, options(0.0));
  torch::optim::AdamW plain(std::move(groups));
  auto run = [&](torch::optim::Optimizer& optimizer, int first, int last) {
    for (int step = first; step < last; ++step) {
      const double lr = train.lr * (1.0 - 0.1 * step);
      pipelines::set_learning_rate(optimizer, lr);
      pipelines::set_learning_rate(plain, lr);
      set_gradients(ours, step);
      set_gradients(theirs, step);
      optimizer.step();
      plain.step();
    }
    for (size_t i = 0; i < ours.size(); ++i) {
      INFO("parameter " << i << " after step " << last);
      CHECK(max_relative_difference(ours[i], theirs[i]) < 1e-6);
      CHECK(!ours[i].equal(make_parameters(device)[i]));  // it moved
    }
  };
  run(*fused, 0, 5);

  // A resumed run: a fresh optimizer loads the checkpoint and goes on.
  torch::serialize::OutputArchive saved;
  fused->save(saved);
  std::ostringstream bytes;
  saved.save_to(bytes);
  auto restored = pipelines::make_adamw(ours, train);
  torch::serialize::InputArchive loaded;
  std::istringstream in(bytes.str());
  loaded.load_from(in, device);
  restored->load(loaded);
  const auto& state = static_cast<const torch::optim::AdamWParamState&>(
      *restored->state().at(ours[3].unsafeGetTensorImpl()));
  CHECK(state.step() == 3);  // steps 0, 2 and 4
  run(*restored, 5, 8);
}

// clip_grad_norm against torch::nn::utils::clip_grad_norm_, clipping (max below the norm) and not.
inline void check_clip_matches_torch(const at::Device& device) {
  for (const double max_norm : {0.5, 1e6}) {
    INFO("max_norm " << max_norm);
    auto ours = make_parameters(device), theirs = make_parameters(device);
    set_gradients(ours, 1);
    set_gradients(theirs, 1);
    const double a = pipelines::clip_grad_norm(ours, max_norm);
    const double b = torch::nn::utils::clip_grad_norm_(theirs, max_norm);
    CHECK(std::abs(a - b) <= 1e-6 * b);
    for (size_t i = 0; i + 1 < ours.size(); ++i) {
      CHECK(max_relative_difference(ours[i].grad(), theirs[i].grad()) < 1e-6);
    }
    CHECK(!ours.back().grad().defined());
  }
}

// read_loss_and_clip gives the loss, and clip_grad_norm's norm and clipping, from one read; a non-finite loss reads a
// norm of 0; max_norm = 0 leaves the gradients alone.
inline void check_read_loss_and_clip(const at::Device& device) {
  auto ours = make_parameters(device), theirs = make_parameters(device);
  set_gradients(ours, 2);
  set_gradients(theirs, 2);
  const auto loss = torch::tensor(2.5f, torch::TensorOptions().device(device));
  const pipelines::StepValues read = pipelines::read_loss_and_clip(loss, ours, 0.5);
  CHECK(read.loss == 2.5);
  const double norm = pipelines::clip_grad_norm(theirs, 0.5);
  CHECK(norm > 0.5);  // the clipping scaled the gradients
  CHECK(read.grad_norm == norm);
  for (size_t i = 0; i < ours.size(); ++i) CHECK(torch::equal(ours[i].grad(), theirs[i].grad()));

  const pipelines::StepValues diverged =
      pipelines::read_loss_and_clip(loss * std::numeric_limits<float>::quiet_NaN(), ours, 0.5);
  CHECK(std::isnan(diverged.loss));
  CHECK(diverged.grad_norm == 0.0);

  auto plain = make_parameters(device);
  set_gradients(plain, 2);
  const auto before = plain[0].grad().clone();
  const pipelines::StepValues unclipped = pipelines::read_loss_and_clip(loss, plain, 0.0);
  CHECK(unclipped.loss == 2.5);
  CHECK(unclipped.grad_norm == 0.0);
  CHECK(torch::equal(plain[0].grad(), before));
}

// DeferredStep against the host's decision (read_loss_and_clip, then a step only when finite), step by step: steps
// with a non-finite loss, and one with a non-finite gradient, leave the parameters, moments and step counts as if they
// had not been taken, including the first step, which creates the parameters' state. Collecting twice, or queueing
// over an uncollected step, is an error.
inline void check_deferred_step_matches_host_decision(const at::Device& device) {
  pipelines::TrainConfig train;
  train.lr = 1e-2;
  train.weight_decay = 0.1;
  auto ours = make_parameters(device), theirs = make_parameters(device);
  auto deferred_opt = pipelines::make_adamw(ours, train), host_opt = pipelines::make_adamw(theirs, train);
  REQUIRE(pipelines::DeferredStep::supported(*deferred_opt));
  pipelines::DeferredStep deferred;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto opts = torch::TensorOptions().device(device);
  for (int step = 0; step < 7; ++step) {
    INFO("step " << step);
    // Step 0 (where every state is created) and step 3 have a NaN loss; step 5 a NaN gradient with a finite loss.
    const double loss_value = step == 0 || step == 3 ? nan : 1.0 + step;
    const auto loss = torch::tensor(loss_value, opts.dtype(torch::kFloat));
    set_gradients(ours, step);
    set_gradients(theirs, step);
    if (step == 5) {
      ours[2].mutable_grad()[0][0][0] = nan;
      theirs[2].mutable_grad()[0][0][0] = nan;
    }
    deferred.queue(loss, ours, 1.0, *deferred_opt);
    CHECK_THROWS_WITH(deferred.queue(loss, ours, 1.0, *deferred_opt),
                      Catch::Contains("the previous step was not collected"));
    const pipelines::StepValues read = deferred.collect();
    const pipelines::StepValues want = pipelines::read_loss_and_clip(loss, theirs, 1.0);
    CHECK((std::isnan(read.loss) ? std::isnan(want.loss) : read.loss == want.loss));
    CHECK((std::isnan(read.grad_norm) ? std::isnan(want.grad_norm) : read.grad_norm == want.grad_norm));
    const bool finite = std::isfinite(want.loss) && std::isfinite(want.grad_norm);
    CHECK(finite == (step != 0 && step != 3 && step != 5));
    if (finite) host_opt->step();
    for (size_t i = 0; i < ours.size(); ++i) {
      INFO("parameter " << i);
      CHECK(torch::equal(ours[i].detach().cpu(), theirs[i].detach().cpu()));
      const auto* a = deferred_opt->state().count(ours[i].unsafeGetTensorImpl())
                          ? &deferred_opt->state().at(ours[i].unsafeGetTensorImpl())
                          : nullptr;
      const auto* b = host_opt->state().count(theirs[i].unsafeGetTensorImpl())
                          ? &host_opt->state().at(theirs[i].unsafeGetTensorImpl())
                          : nullptr;
      const auto step_of = [](const auto* s) {
        return s ? static_cast<const torch::optim::AdamWParamState&>(**s).step() : int64_t{0};
      };
      CHECK(step_of(a) == step_of(b));
      if (a && b) {
        const auto& sa = static_cast<const torch::optim::AdamWParamState&>(**a);
        const auto& sb = static_cast<const torch::optim::AdamWParamState&>(**b);
        CHECK(torch::equal(sa.exp_avg().cpu(), sb.exp_avg().cpu()));
        CHECK(torch::equal(sa.exp_avg_sq().cpu(), sb.exp_avg_sq().cpu()));
      }
    }
  }
  CHECK(!ours[0].equal(make_parameters(device)[0]));  // it moved
  CHECK_THROWS_WITH(deferred.collect(), Catch::Contains("no step is queued"));
}

}  // namespace longnet::test
