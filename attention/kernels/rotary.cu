// rotary: RoPE/xPos on (B, N, H, D) in one pass, forward and (transposed) backward.
//
// As torch ops the encoding took eleven kernels forward (casts to float32, four products, a sum, a difference, the
// concatenation, the cast back) and more backward, on q and k of every layer: about a quarter of the GPU time of a
// multimodal training step. Here a thread owns kVec consecutive pairs of one row: it reads both halves and the
// token's table entries once and writes both halves once. Without tables it copies (strided rows into contiguous
// ones or back), with 16-byte accesses where torch's copy of such views goes element by element. A float32 x with a
// 16-bit out (the attention backward's accumulators into the packed gradient) is converted in the same pass.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/elementwise.cuh"
#include "attention/kernels/rotary.h"

namespace longnet::attention::kernels {
namespace {

using namespace elementwise;

constexpr int kThreads = 256;

// TIn: x's element type; T: out's.
template <typename TIn, typename T, int kVec, bool kScale, bool kTranspose, bool kCopy = false>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p, int64_t total, int64_t vectors) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (gid >= total) return;
  const int64_t half = p.head_dim / 2;
  const int64_t i = (gid % vectors) * kVec;  // first pair of this thread
  int64_t rest = gid / vectors;              // row = (b·N + n)·H + h
  const int64_t h = rest % p.heads;
  rest /= p.heads;
  const int64_t n = rest % p.n;
  const int64_t b = rest / p.n;
  const TIn* x = static_cast<const TIn*>(p.x) + b * p.x_strides[0] + n * p.x_strides[1] + h * p.x_strides[2] + i;
  T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + n * p.out_strides[1] + h * p.out_strides[2] + i;
  const int64_t table = n * half + i;
  const Vec<TIn, kVec> x1 = *reinterpret_cast<const Vec<TIn, kVec>*>(x);
  const Vec<TIn, kVec> x2 = *reinterpret_cast<const Vec<TIn, kVec>*>(x + half);
  Vec<T, kVec> y1, y2;
  if constexpr (kCopy) {  // exact: every 16-bit value is a float32 one
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      y1.v[e] = from_float<T>(to_float(x1.v[e]));
      y2.v[e] = from_float<T>(to_float(x2.v[e]));
    }
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float c = p.cos[table + e];
      // The transpose of a rotation is the rotation by the opposite angle.
      const float s = kTranspose ? -p.sin[table + e] : p.sin[table + e];
      const float z = kScale ? p.scale[table + e] : 1.f;
      const float a = to_float(x1.v[e]), bb = to_float(x2.v[e]);
      y1.v[e] = from_float<T>((a * c - bb * s) * z);
      y2.v[e] = from_float<T>((bb * c + a * s) * z);
    }
  }
  *reinterpret_cast<Vec<T, kVec>*>(out) = y1;
  *reinterpret_cast<Vec<T, kVec>*>(out + half) = y2;
}

template <typename TIn, typename T, int kVec>
void launch_typed(const RotaryParams& p, int64_t rows) {
  const int64_t vectors = p.head_dim / 2 / kVec;
  const int64_t total = rows * vectors;
  const unsigned grid = grid_for("launch_rotary", total, kThreads);
  const bool scale = p.scale != nullptr;
  if (p.cos == nullptr) {
    rotary_kernel<TIn, T, kVec, false, false, true><<<grid, kThreads, 0, p.stream>>>(p, total, vectors);
  } else if (scale && p.transpose) {
    rotary_kernel<TIn, T, kVec, true, true><<<grid, kThreads, 0, p.stream>>>(p, total, vectors);
  } else if (scale) {
    rotary_kernel<TIn, T, kVec, true, false><<<grid, kThreads, 0, p.stream>>>(p, total, vectors);
  } else if (p.transpose) {
    rotary_kernel<TIn, T, kVec, false, true><<<grid, kThreads, 0, p.stream>>>(p, total, vectors);
  } else {
    rotary_kernel<TIn, T, kVec, false, false><<<grid, kThreads, 0, p.stream>>>(p, total, vectors);
  }
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

template <typename TIn, typename T>
void launch_dtype(const RotaryParams& p, int64_t rows) {
  // 16-byte vectors of out (16 or 32 bytes of x) where every row and both halves start on a vector boundary; single
  // elements otherwise.
  constexpr int kVec = 16 / sizeof(T);
  bool vectorized = (p.head_dim / 2) % kVec == 0 && aligned(p.x, kVec * sizeof(TIn)) && aligned(p.out, 16);
  for (int d = 0; d < 3; ++d) vectorized = vectorized && p.x_strides[d] % kVec == 0 && p.out_strides[d] % kVec == 0;
  if (vectorized) {
    launch_typed<TIn, T, kVec>(p, rows);
  } else {
    launch_typed<TIn, T, 1>(p, rows);
  }
}

}  // namespace

void launch_rotary(const RotaryParams& params) {
  if (params.x == nullptr || params.out == nullptr || (params.cos == nullptr) != (params.sin == nullptr) ||
      (params.cos == nullptr && params.scale != nullptr)) {
    throw std::invalid_argument("launch_rotary: x and out must be device pointers, and cos and sin both or neither "
                                "(scale only with them)");
  }
  if (params.head_dim < 2 || params.head_dim % 2 != 0) {
    throw std::invalid_argument("launch_rotary: head_dim must be even and >= 2, got " +
                                std::to_string(params.head_dim));
  }
  if (params.batch < 0 || params.n < 0 || params.heads < 0) {
    throw std::invalid_argument("launch_rotary: batch, n and heads must be >= 0");
  }
  const int64_t rows = params.batch * params.n * params.heads;
  if (rows == 0) return;
  elementwise::with_element_type(params.dtype, [&](auto element) {
    using T = decltype(element);
    if (params.x_float32) {
      launch_dtype<float, T>(params, rows);
    } else {
      launch_dtype<T, T>(params, rows);
    }
  });
}

}  // namespace longnet::attention::kernels
