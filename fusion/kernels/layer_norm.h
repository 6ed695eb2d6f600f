// LayerNorm over the last dimension with float32 affine parameters, writing its output in a 16-bit type (the
// autocast dtype), and its backward from a 16-bit output gradient to the input gradient. The input (the residual
// stream) and its gradient are float32 or that 16-bit type; statistics and arithmetic are float32 either way.
// Optionally fused with the residual add before it: s = x + a (a in the 16-bit type) is written and normalised, and
// the backward adds the gradient that reaches s from its other uses and also writes the gradient of a.
// For fusion/layer_norm.cpp: CUDA and the standard library only.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention/kernels/params.h"

namespace longnet::fusion::kernels {

using attention::kernels::ElementType;

// The widest row the kernels take: a warp holds a row in registers, 4 floats a lane per 128 columns.
constexpr int64_t kLayerNormMaxWidth = 1024;

struct LayerNormForwardParams {
  const void* x = nullptr;        // (rows, width) contiguous, `x_dtype`
  const void* residual = nullptr;  // a (rows, width) `dtype`, or null: with it, x + a is normalised and stored in sum
  void* sum = nullptr;             // (rows, width) `x_dtype`: x + a (with residual only); a 16-bit sum is normalised
                                   // as rounded
  const float* weight = nullptr;  // (width)
  const float* bias = nullptr;    // (width)
  void* y = nullptr;              // (rows, width) contiguous, `dtype`
  float* mean = nullptr;          // (rows)
  float* rstd = nullptr;          // (rows): 1 / sqrt(biased variance + eps)
  int64_t rows = 0, width = 0;
  float eps = 1e-5f;
  ElementType dtype = ElementType::bfloat16;    // of y: float16 or bfloat16
  ElementType x_dtype = ElementType::float32;  // of x and sum: float32 or `dtype`
  cudaStream_t stream = nullptr;
};

struct LayerNormBackwardParams {
  const void* dy = nullptr;  // (rows, width) contiguous, `dtype`
  const void* x = nullptr;   // the normalised input (x + a with a residual), `x_dtype`
  const float* weight = nullptr;
  const void* grad_sum = nullptr;  // `x_dtype`: gradient reaching x + a from its other uses, added to dx; may be null
  // (rows, width) `dtype`: dx rounded, the gradient of a; null without a residual. With a 16-bit stream it is dx
  // itself (written once).
  void* grad_residual = nullptr;
  const float* mean = nullptr;
  const float* rstd = nullptr;
  void* dx = nullptr;         // (rows, width) `x_dtype`
  float* partials = nullptr;  // (layer_norm_partial_rows(rows), 2, width): per-warp sums of dy·x̂ and dy
  int64_t rows = 0, width = 0;
  ElementType dtype = ElementType::bfloat16;
  ElementType x_dtype = ElementType::float32;  // of x, grad_sum and dx: float32 or `dtype`
  cudaStream_t stream = nullptr;
};

// Both throw std::invalid_argument for bad sizes, pointers or types (width must be a multiple of 4 in [4, 1024],
// pointers 16-byte aligned) and std::runtime_error naming the CUDA error when a launch fails. Zero rows do nothing.
void launch_layer_norm_forward(const LayerNormForwardParams& params);
void launch_layer_norm_backward(const LayerNormBackwardParams& params);

// Rows of LayerNormBackwardParams::partials that the backward writes for `rows` input rows; their sum over the first
// dimension is (dweight, dbias).
int64_t layer_norm_partial_rows(int64_t rows);

}  // namespace longnet::fusion::kernels
