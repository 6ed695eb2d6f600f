// position_sum: an encoder's output with learned positions, out = (h + modality) + ((T0[p0] + T1[p1]) + T2[p2]), in
// one pass (the order and float32 arithmetic of the torch ops it replaces, so the result is the same to the bit).
// For modalities/encoders.cpp: CUDA and the standard library only.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention/kernels/params.h"

namespace longnet::modalities::kernels {

using attention::kernels::ElementType;

constexpr int kMaxPositionAxes = 3;

struct PositionSumParams {
  const void* h = nullptr;            // (rows, width) contiguous, `h_dtype`: the token or patch embeddings
  const float* modality = nullptr;    // (width)
  const float* tables[kMaxPositionAxes] = {};  // axis a: (table_rows, width) contiguous
  int axes = 0;                       // 1 to kMaxPositionAxes
  int64_t table_rows = 0;             // max_positions: every position must lie in [0, table_rows)
  const int64_t* positions = nullptr;  // row r, axis a at positions[r · position_stride + a]
  int64_t position_stride = 0;
  float* out = nullptr;               // (rows, width) contiguous
  int64_t rows = 0, width = 0;
  ElementType h_dtype = ElementType::float32;
  cudaStream_t stream = nullptr;
};

// Throws std::invalid_argument for bad sizes (width a positive multiple of 4, 1 to 3 axes), null or unaligned
// pointers (16 bytes for the float32 rows, 8 for 16-bit h), and std::runtime_error naming the CUDA error when the
// launch fails. Zero rows do nothing. A position outside [0, table_rows) stops the kernel with a device-side trap,
// as torch's embedding lookup does.
void launch_position_sum(const PositionSumParams& params);

}  // namespace longnet::modalities::kernels
