// x·Wᵀ + b as at::linear computes it, with the bias gradient on CUDA from one column-sum kernel
// (attention/kernels/column_sum.h) instead of torch's reduction, which ran at about two thirds of the memory
// bandwidth on the (rows, out) gradients of a training step's projections. The attention module's projections use
// it, and the feed-forward layer (fusion/gelu_mlp.h) takes column_sum for its own bias gradients.
#pragma once

#include <ATen/core/Tensor.h>

namespace longnet::attention {

// at::linear(x, weight, bias): x (..., in), weight (out, in), bias (out) or undefined, under autocast as at::linear
// (operands cast to the autocast dtype, weights through autocast's cache). With CUDA operands of one 16-bit dtype
// (after that cast), a bias, and in and out multiples of 8, the forward is the same addmm and the backward the same
// two GEMMs, with db = column_sum(dy); otherwise it is at::linear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

// x (rows, cols) summed over its rows, (cols) in x's dtype: one float32 sum rounded once for a contiguous 16-bit
// CUDA x whose cols is a multiple of 8 up to 8192 (in a build with CUDA), x.sum(0) otherwise.
at::Tensor column_sum(const at::Tensor& x);

}  // namespace longnet::attention
