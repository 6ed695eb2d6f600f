// LayerNorm over the last dimension with float32 input and float32 affine parameters, writing its output in a
// 16-bit type (the autocast dtype), and its backward from a 16-bit output gradient to a float32 input gradient.
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
  const float* x = nullptr;       // (rows, width) contiguous
  const void* residual = nullptr;  // a (rows, width) `dtype`, or null: with it, x + a is normalised and stored in sum
  float* sum = nullptr;            // (rows, width): x + a (with residual only)
  const float* weight = nullptr;  // (width)
  const float* bias = nullptr;    // (width)
  void* y = nullptr;              // (rows, width) contiguous, `dtype`
  float* mean = nullptr;          // (rows)
  float* rstd = nullptr;          // (rows): 1 / sqrt(biased variance + eps)
  int64_t rows = 0, width = 0;
  float eps = 1e-5f;
  ElementType dtype = ElementType::bfloat16;  // of y: float16 or bfloat16
  cudaStream_t stream = nullptr;
};

struct LayerNormBackwardParams {
  const void* dy = nullptr;  // (rows, width) contiguous, `dtype`
  const float* x = nullptr;  // the normalised input (x + a with a residual)
  const float* weight = nullptr;
  const float* grad_sum = nullptr;  // gradient reaching x + a from its other uses, added to dx; may be null
  void* grad_residual = nullptr;    // (rows, width) `dtype`: dx rounded, the gradient of a; null without a residual
  const float* mean = nullptr;
  const float* rstd = nullptr;
  float* dx = nullptr;        // (rows, width)
  float* partials = nullptr;  // (layer_norm_partial_rows(rows), 2, width): per-warp sums of dy·x̂ and dy
  int64_t rows = 0, width = 0;
  ElementType dtype = ElementType::bfloat16;
  cudaStream_t stream = nullptr;
};

// Both throw std::invalid_argument for bad sizes or pointers (width must be a multiple of 4 in [4, 1024], pointers
// 16-byte aligned) and std::runtime_error naming the CUDA error when a launch fails. Zero rows do nothing.
void launch_layer_norm_forward(const LayerNormForwardParams& params);
void launch_layer_norm_backward(const LayerNormBackwardParams& params);

// Rows of LayerNormBackwardParams::partials that the backward writes for `rows` input rows; their sum over the first
// dimension is (dweight, dbias).
int64_t layer_norm_partial_rows(int64_t rows);

}  // namespace longnet::fusion::kernels
