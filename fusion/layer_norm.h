// longnet::fusion::LayerNorm: torch::nn::LayerNorm whose output under CUDA autocast is already in the autocast dtype.
// The pre-norms of the transformer blocks are ones.
//
// Autocast runs layer_norm in float32 and returns float32; the linear layer after it then casts that output to
// bf16, and its backward casts the gradient back: two passes over an activation of every block, each way. Under CUDA
// autocast, for a float32 input with affine parameters and a width that is a multiple of 4 up to 1024, this module
// runs one kernel each way instead (fusion/kernels/layer_norm.cu): float32 arithmetic, the output rounded once to the
// autocast dtype (what the cast after torch's float32 output gives, up to float32 summation order), and a float32
// input gradient from the 16-bit output gradient. An input already in the autocast dtype (a 16-bit residual stream,
// ModelConfig::autocast_residual) takes the same kernels, its gradient in that dtype. Everywhere else it is torch's
// LayerNorm. Parameters, their names and the options are torch's.
#pragma once

#include <utility>

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

namespace longnet::fusion {

class LayerNormImpl : public torch::nn::LayerNormImpl {
 public:
  using torch::nn::LayerNormImpl::LayerNormImpl;
  at::Tensor forward(const at::Tensor& x);
  // {x + a, forward(x + a)}: the residual add before a pre-norm. Where the one-kernel path applies and a is in the
  // autocast dtype (an attention or MLP output), the add is fused into the same kernel each way, and the backward
  // also adds the gradient that x + a receives from its other uses and rounds the gradient of a.
  std::pair<at::Tensor, at::Tensor> forward_residual(const at::Tensor& x, const at::Tensor& a);
  // The norm after a stack's last block. An input already in the autocast dtype (a 16-bit residual stream,
  // ModelConfig::autocast_residual) takes the one-kernel path and stays in that dtype, where torch's LayerNorm would
  // cast it to float32 and back each way; any other input takes torch's LayerNorm (float32 under autocast).
  at::Tensor forward_keeping_dtype(const at::Tensor& x);

 private:
  bool one_kernel(const at::Tensor& x) const;  // CUDA autocast and an input the kernels take
};
TORCH_MODULE(LayerNorm);

// The layer norm of x (CUDA, float32 or out_dtype, last dim = weight's width) with the output in `out_dtype` (kHalf
// or kBFloat16), differentiable in x, weight and bias; the one-kernel path of LayerNorm::forward. Throws longnet::Error
// when the build has no CUDA kernels or the inputs are outside what the kernel takes.
at::Tensor layer_norm_to(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                         at::ScalarType out_dtype);

// {x + a, layer_norm_to(x + a, ...)} in one kernel each way, a (x's shape) in out_dtype; the path of
// LayerNorm::forward_residual. Same requirements and errors as layer_norm_to.
std::pair<at::Tensor, at::Tensor> add_layer_norm_to(const at::Tensor& x, const at::Tensor& a, const at::Tensor& weight,
                                                    const at::Tensor& bias, double eps, at::ScalarType out_dtype);

}  // namespace longnet::fusion
