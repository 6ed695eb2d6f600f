#include "fusion/checkpoint.h"

#include <optional>
#include <utility>

#include <ATen/autocast_mode.h>
#include <ATen/Context.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

namespace longnet::fusion {
namespace {

using torch::autograd::variable_list;

// The random state of the generators a rerun draws from: the CPU one, and the input's CUDA device's.
struct RngState {
  at::Tensor cpu, device;
  std::optional<c10::Device> cuda;

  static RngState capture(const at::Tensor& x) {
    RngState s;
    s.cpu = at::detail::getDefaultCPUGenerator().get_state();
    if (x.is_cuda()) {
      s.cuda = x.device();
      at::Generator gen = at::globalContext().defaultGenerator(x.device());
      s.device = gen.get_state();
    }
    return s;
  }
  void restore() const {
    at::Generator host = at::detail::getDefaultCPUGenerator();
    host.set_state(cpu);
    if (cuda) {
      at::Generator gen = at::globalContext().defaultGenerator(*cuda);
      gen.set_state(device);
    }
  }
};

// The autocast setting of CUDA (bf16/fp16 training) at the first run; the backward runs on the autograd engine's
// threads, where autocast is off unless set.
struct AutocastState {
  bool enabled = false;
  at::ScalarType dtype = at::kHalf;
};

class CheckpointBackward : public torch::autograd::Node {
 public:
  CheckpointBackward(std::function<at::Tensor(const at::Tensor&)> fn, at::Tensor input, RngState rng,
                     AutocastState autocast)
      : fn_(std::move(fn)), input_(std::move(input)), rng_(std::move(rng)), autocast_(autocast) {}

  variable_list apply(variable_list&& grads) override {
    at::Tensor x = input_.detach().requires_grad_(true);
    at::Tensor out;
    {
      // The rerun draws the same dropout masks; the generators continue afterwards as they were.
      const RngState now = RngState::capture(input_);
      rng_.restore();
      const bool autocast_was = at::autocast::is_autocast_enabled(at::kCUDA);
      const at::ScalarType dtype_was = at::autocast::get_autocast_dtype(at::kCUDA);
      at::autocast::set_autocast_enabled(at::kCUDA, autocast_.enabled);
      at::autocast::set_autocast_dtype(at::kCUDA, autocast_.dtype);
      try {
        const torch::autograd::AutoGradMode grad(true);
        out = fn_(x);
      } catch (...) {
        at::autocast::set_autocast_enabled(at::kCUDA, autocast_was);
        at::autocast::set_autocast_dtype(at::kCUDA, dtype_was);
        now.restore();
        throw;
      }
      at::autocast::set_autocast_enabled(at::kCUDA, autocast_was);
      at::autocast::set_autocast_dtype(at::kCUDA, dtype_was);
      now.restore();
    }
    // Parameters are leaves: their gradients accumulate here, as in the plain backward pass.
    torch::autograd::backward({out}, {grads.at(0)});
    fn_ = nullptr;  // one backward pass per forward, as for saved activations
    input_ = at::Tensor();
    return {x.grad()};
  }

  std::string name() const override { return "CheckpointBackward"; }

 private:
  std::function<at::Tensor(const at::Tensor&)> fn_;
  at::Tensor input_;
  RngState rng_;
  AutocastState autocast_;
};

}  // namespace

at::Tensor checkpointed(std::function<at::Tensor(const at::Tensor&)> fn, const at::Tensor& x) {
  if (!torch::autograd::GradMode::is_enabled() || !x.requires_grad()) return fn(x);
  RngState rng = RngState::capture(x);
  const AutocastState autocast{at::autocast::is_autocast_enabled(at::kCUDA), at::autocast::get_autocast_dtype(at::kCUDA)};
  at::Tensor out;
  {
    const torch::autograd::AutoGradMode no_grad(false);
    out = fn(x);
  }
  auto node = std::shared_ptr<CheckpointBackward>(
      new CheckpointBackward(std::move(fn), x.detach(), std::move(rng), autocast), torch::autograd::deleteNode);
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  torch::autograd::set_history(out, node);
  return out;
}

}  // namespace longnet::fusion
