// Plain parameter structs shared by the attention CUDA kernels and their torch glue: raw pointers, int64 sizes and
// strides (in elements), flags and a stream. No torch and no CUDA headers, so benchmarks and tests can fill them too.
#pragma once

#include <cstdint>

// The CUDA runtime's own spelling of a stream handle (driver_types.h declares the same alias).
typedef struct CUstream_st* cudaStream_t;

namespace longnet::attention::kernels {

enum class ElementType : int { float32, float16, bfloat16 };

// combine_by_lse: merges one branch's (out_i, lse_i) into the running (out, lse), in place.
//
// Rows are addressed by a 4-d index (i0, i1, i2, i3) of sizes rows[0..3]; every row has head_dim elements along the
// last (contiguous) dimension. With the flash backend's views this is (batch, segment, head, row of segment), but the
// kernel only sees strides, so any strided layout of either operand works without gather copies.
//
//   lse'  = logaddexp(lse, lse_i)
//   out'  = exp(lse - lse') · out + exp(lse_i - lse') · out_i
//
// A row whose lse_i is -inf or NaN (a branch row whose keys were all removed) leaves (out, lse) untouched; a row whose
// running lse is -inf takes (out_i, lse_i) as they are. Arithmetic is float32 whatever the element type.
struct LseCombineParams {
  void* out = nullptr;          // running output, element type `dtype`, strides out_strides (last dim stride 1)
  const void* out_i = nullptr;  // branch output, same element type, strides out_i_strides (last dim stride 1)
  float* lse = nullptr;         // running log-sum-exp, strides lse_strides
  const float* lse_i = nullptr; // branch log-sum-exp, strides lse_i_strides

  int64_t rows[4] = {1, 1, 1, 1};
  int64_t head_dim = 0;
  int64_t out_strides[4] = {0, 0, 0, 0};
  int64_t out_i_strides[4] = {0, 0, 0, 0};
  int64_t lse_strides[4] = {0, 0, 0, 0};
  int64_t lse_i_strides[4] = {0, 0, 0, 0};

  ElementType dtype = ElementType::bfloat16;
  cudaStream_t stream = nullptr;
};

}  // namespace longnet::attention::kernels
