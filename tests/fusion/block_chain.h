// What the CPU and GPU tests of run_blocks compare: a chain of blocks run by run_blocks or called in turn.
#pragma once

#include <vector>

#include <torch/torch.h>

#include "fusion/block.h"
#include "tests/support/autocast.h"

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
    const CudaAutocast guard(autocast);
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
