// The feed-forward layer fc2(gelu_tanh(fc1(x))) with the biases, the GELU and the GELU's derivative in the GEMMs'
// epilogues (fusion/kernels/gemm_epilogue.h) instead of separate passes over the hidden activation:
//   forward:  h = gelu(x·W1ᵀ + b1) keeping the pre-activation; y = h·W2ᵀ + b2
//   backward: dpre = (dy·W2) ⊙ gelu'(pre) in one GEMM; dW2, dW1 and dx: torch's GEMMs; db1 and db2: column sums
//   (attention/linear.h).
// bench/bench_mlp.cpp times it, piece by piece, against torch's operators (results: bench/results/h100_mlp.md).
// The GELU is the tanh approximation (torch's gelu(approximate="tanh")), which is what the epilogue computes.
#pragma once

#include <ATen/core/Tensor.h>

namespace longnet::fusion {

// Whether gelu_mlp takes these operands: CUDA tensors of one 16-bit dtype on one device, x (..., C) with at least one
// row, W1 (H, C), b1 (H), W2 (C, H), b2 (C), C and H multiples of 8. Always false in a build without CUDA.
bool gelu_mlp_takes(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2);

// y (x's shape) = gelu_tanh(x·W1ᵀ + b1)·W2ᵀ + b2, differentiable in every operand. Throws longnet::Error when
// gelu_mlp_takes is false.
at::Tensor gelu_mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2);

}  // namespace longnet::fusion
