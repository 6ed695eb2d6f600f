// apply_linear(layer, x): a torch::nn::Linear applied through at::linear. Header-only (the compiled core has no torch);
// for the torch libraries.
//
// torch::nn::Linear's forward (torch::nn::functional::linear) runs x·Wᵀ as a matmul and then adds the bias in place
// for inputs of more than two dimensions. Under bf16 autocast that add mixes the bf16 product with the float32 bias in
// a broadcasting kernel that cannot vectorise, and its backward reduces the bias gradient in a separate pass: 12 % of
// the GPU time of a multimodal training step. at::linear casts all three operands and folds (B, N, C) inputs into one
// addmm with the bias in the GEMM's epilogue.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/modules/linear.h>

namespace longnet {

inline at::Tensor apply_linear(const torch::nn::Linear& layer, const at::Tensor& x) {
  return at::linear(x, layer->weight, layer->bias);
}

}  // namespace longnet
