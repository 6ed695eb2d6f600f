// What the CPU and GPU tests of run_blocks compare: a chain of blocks run by run_blocks or called in turn.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include "fusion/block.h"
#include "tests/support/autocast.h"

namespace longnet::test {

// `count` blocks of one configuration on `device`, block i's weights drawn after seeding with first_seed + i.
inline std::vector<fusion::TransformerBlock> seeded_blocks(const fusion::ModelConfig& model,
                                                           const fusion::AttentionConfig& attention, int count,
                                                           uint64_t first_seed, torch::Device device) {
  std::vector<fusion::TransformerBlock> blocks;
  for (int i = 0; i < count; ++i) {
    torch::manual_seed(first_seed + static_cast<uint64_t>(i));
    blocks.emplace_back(model, attention);
    blocks.back()->to(device);
  }
  return blocks;
}

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
