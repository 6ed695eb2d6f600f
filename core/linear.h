// longnet::Linear: torch::nn::Linear whose forward is at::linear. Every linear layer of the toolkit's modules is one.
// Header-only (the compiled core has no torch); for the torch libraries.
//
// torch::nn::Linear's own forward (torch::nn::functional::linear) runs x·Wᵀ as a matmul and then adds the bias in place
// for inputs of more than two dimensions. Under bf16 autocast that add mixes the bf16 product with the float32 bias in
// a broadcasting kernel that cannot vectorise, and its backward reduces the bias gradient in a separate pass: 12 % of
// the GPU time of a multimodal training step. at::linear casts all three operands and folds (B, N, C) inputs into one
// addmm with the bias in the GEMM's epilogue. Parameters, their names and the options are torch's.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

namespace longnet {

class LinearImpl : public torch::nn::LinearImpl {
 public:
  using torch::nn::LinearImpl::LinearImpl;
  at::Tensor forward(const at::Tensor& x) { return at::linear(x, weight, bias); }
};
TORCH_MODULE(Linear);

}  // namespace longnet
