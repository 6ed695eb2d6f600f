// column_sum: the sum over the rows of a (rows, cols) 16-bit matrix, in float32, rounded once to the matrix's type:
// the bias gradient of a linear layer (attention/linear.h). For attention/linear.cpp: CUDA and the standard library
// only.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention/kernels/params.h"

namespace longnet::attention::kernels {

constexpr int64_t kColumnSumMaxCols = 8192;  // a block holds a whole row, 8 columns a thread

struct ColumnSumParams {
  const void* x = nullptr;    // (rows, cols) contiguous, `dtype`, 16-byte aligned
  float* partials = nullptr;  // (column_sum_partial_rows(rows, cols), cols), 16-byte aligned: one sum per chunk of
                              // rows
  void* out = nullptr;        // (cols), `dtype`
  int64_t rows = 0, cols = 0;
  ElementType dtype = ElementType::bfloat16;  // float16 or bfloat16
  cudaStream_t stream = nullptr;
};

// Rows of ColumnSumParams::partials for a (rows, cols) matrix on the current device (the grid fills its SMs once).
int64_t column_sum_partial_rows(int64_t rows, int64_t cols);

// Throws std::invalid_argument for a float32 dtype, null or unaligned pointers, rows < 1 or cols not a multiple of 8
// in [8, kColumnSumMaxCols], and std::runtime_error naming the CUDA error when a launch fails.
void launch_column_sum(const ColumnSumParams& params);

}  // namespace longnet::attention::kernels
