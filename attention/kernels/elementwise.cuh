// What the memory-bound kernels (attention's lse_combine.cu, grad_gather.cu and rotary.cu, and
// fusion/kernels/layer_norm.cu) share: float32 arithmetic
// on float32/fp16/bf16 elements, 16-byte vectors of them, rows addressed by a 4-d index and strides, and the host
// checks before a launch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/kernels/params.h"

namespace longnet::attention::kernels::elementwise {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// kVec elements moved as one access (16 bytes when kVec = 16 / sizeof(T)).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

__device__ __forceinline__ int64_t offset_of(const int64_t (&index)[4], const int64_t (&strides)[4]) {
  return index[0] * strides[0] + index[1] * strides[1] + index[2] * strides[2] + index[3] * strides[3];
}

// (i0, i1, i2, i3) of flat row `row` = ((i0·rows1 + i1)·rows2 + i2)·rows3 + i3.
__device__ __forceinline__ void row_index(int64_t row, const int64_t (&rows)[4], int64_t (&index)[4]) {
  index[3] = row % rows[3];
  row /= rows[3];
  index[2] = row % rows[2];
  row /= rows[2];
  index[1] = row % rows[1];
  index[0] = row / rows[1];
}

inline bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The number of rows of a 4-d row grid; throws std::invalid_argument naming `launcher` for a negative size.
inline int64_t row_count(const char* launcher, const int64_t (&rows)[4]) {
  int64_t total = 1;
  for (int d = 0; d < 4; ++d) {
    if (rows[d] < 0) {
      throw std::invalid_argument(std::string(launcher) + ": rows[" + std::to_string(d) + "] must be >= 0, got " +
                                  std::to_string(rows[d]));
    }
    total *= rows[d];
  }
  return total;
}

// Blocks of `threads` for `total` work items, within one launch's grid; throws std::runtime_error otherwise.
inline unsigned grid_for(const char* launcher, int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 2147483647LL) {
    throw std::runtime_error(std::string(launcher) + ": " + std::to_string(total) +
                             " work items exceed one launch's grid; split the call");
  }
  return static_cast<unsigned>(blocks);
}

// f(T{}) with T the C++ type of `type`: the launchers' dispatch, f being a generic lambda.
template <typename F>
void with_element_type(ElementType type, F&& f) {
  switch (type) {
    case ElementType::float32: f(float{}); break;
    case ElementType::float16: f(__half{}); break;
    case ElementType::bfloat16: f(__nv_bfloat16{}); break;
  }
}

// Throws std::invalid_argument naming `launcher` unless head_dim > 0.
inline void require_head_dim(const char* launcher, int64_t head_dim) {
  if (head_dim <= 0) {
    throw std::invalid_argument(std::string(launcher) + ": head_dim must be > 0, got " + std::to_string(head_dim));
  }
}

}  // namespace longnet::attention::kernels::elementwise
