// What the CPU and GPU tests of run_blocks compare: a chain of blocks run by run_blocks or called in turn.
#pragma once

#include <vector>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include "fusion/block.h"

namespace longnet::test {

// The output, the input's gradient and every parameter's gradient of `blocks` on x0 under the loss sum(y²), with the
// blocks chained by run_blocks (`stream`) or called one after another; the forward under CUDA bf16 autocast when
// `autocast` is set.
inline std::vector<at::Tensor> chain_outputs(std::vector<fusion::TransformerBlock>& blocks, const at::Tensor& x0,
                                             bool stream, bool autocast) {
  for (auto& b : blocks) b->zero_grad();
  const at::Tensor x = x0.clone().requires_grad_();
  at::Tensor y = x;
  {
    // Off again however the forward ends: a failing case must not leave autocast on for the tests after it.
    struct Autocast {
      bool on;
      explicit Autocast(bool enable) : on(enable) {
        if (!on) return;
        at::autocast::set_autocast_enabled(at::kCUDA, true);
        at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
      }
      ~Autocast() {
        if (!on) return;
        at::autocast::set_autocast_enabled(at::kCUDA, false);
        at::autocast::clear_cache();
      }
      Autocast(const Autocast&) = delete;
      Autocast& operator=(const Autocast&) = delete;
    } guard(autocast);
    if (stream) {
      y = fusion::run_blocks(blocks, x).value();
    } else {
      for (auto& b : blocks) y = b(y);
    }
  }
  y.to(x0.scalar_type()).pow(2).sum().backward();
  std::vector<at::Tensor> out{y.detach(), x.grad()};
  for (auto& b : blocks) {
    for (const auto& p : b->parameters()) out.push_back(p.grad().clone());
  }
  return out;
}

}  // namespace longnet::test
