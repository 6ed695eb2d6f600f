// rotary: RoPE/xPos on (B, N, H, D) in one pass, forward and (transposed) backward.
//
// As torch ops the encoding took eleven kernels forward (casts to float32, four products, a sum, a difference, the
// concatenation, the cast back) and more backward, on q and k of every layer: about a quarter of the GPU time of a
// multimodal training step. Here a thread owns kVec consecutive pairs of one row: it reads both halves and the
// token's table entries once and writes both halves once. Without tables it copies (strided rows into contiguous
// ones or back), with 16-byte accesses where torch's copy of such views goes element by element. A float32 x with a
// 16-bit out (the attention backward's accumulators into the packed gradient) is converted in the same pass.
#include <climits>
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

// kVec table entries from `t` (16-byte loads when kVec is a multiple of 4: launch_dtype checks the alignment).
template <int kVec>
__device__ __forceinline__ void load_table(const float* t, float (&out)[kVec]) {
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int e = 0; e < kVec; e += 4) {
      const float4 v = *reinterpret_cast<const float4*>(t + e);
      out[e] = v.x, out[e + 1] = v.y, out[e + 2] = v.z, out[e + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = t[e];
  }
}

// TIn: x's element type; T: out's. Index: the type of the thread-index arithmetic, 32 bits where the thread count
// allows (64-bit division costs several times more, and a thread does three).
template <typename TIn, typename T, int kVec, bool kScale, bool kTranspose, bool kCopy, typename Index>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p, Index total, Index vectors) {
  const Index gid = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x;
  if (gid >= total) return;
  const auto half = static_cast<Index>(p.head_dim / 2);
  const Index i = (gid % vectors) * kVec;  // first pair of this thread
  Index rest = gid / vectors;              // row = (b·N + n)·H + h
  const auto heads = static_cast<Index>(p.heads), n_total = static_cast<Index>(p.n);
  const Index h = rest % heads;
  rest /= heads;
  const Index n = rest % n_total;
  const Index b = rest / n_total;
  const TIn* x = static_cast<const TIn*>(p.x) + static_cast<int64_t>(b) * p.x_strides[0] +
                 static_cast<int64_t>(n) * p.x_strides[1] + static_cast<int64_t>(h) * p.x_strides[2] + i;
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(b) * p.out_strides[0] +
           static_cast<int64_t>(n) * p.out_strides[1] + static_cast<int64_t>(h) * p.out_strides[2] + i;
  const int64_t table = static_cast<int64_t>(n) * half + i;
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
    float c[kVec], sn[kVec], z[kVec];
    load_table<kVec>(p.cos + table, c);
    load_table<kVec>(p.sin + table, sn);
    if constexpr (kScale) load_table<kVec>(p.scale + table, z);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      // The transpose of a rotation is the rotation by the opposite angle.
      const float s = kTranspose ? -sn[e] : sn[e];
      const float a = to_float(x1.v[e]), bb = to_float(x2.v[e]);
      if constexpr (kScale) {
        y1.v[e] = from_float<T>((a * c[e] - bb * s) * z[e]);
        y2.v[e] = from_float<T>((bb * c[e] + a * s) * z[e]);
      } else {
        y1.v[e] = from_float<T>(a * c[e] - bb * s);
        y2.v[e] = from_float<T>(bb * c[e] + a * s);
      }
    }
  }
  *reinterpret_cast<Vec<T, kVec>*>(out) = y1;
  *reinterpret_cast<Vec<T, kVec>*>(out + half) = y2;
}

template <typename TIn, typename T, int kVec, typename Index>
void launch_indexed(const RotaryParams& p, int64_t total, int64_t vectors) {
  const unsigned grid = grid_for("launch_rotary", total, kThreads);
  const auto t = static_cast<Index>(total), v = static_cast<Index>(vectors);
  const bool scale = p.scale != nullptr;
  if (p.cos == nullptr) {
    rotary_kernel<TIn, T, kVec, false, false, true, Index><<<grid, kThreads, 0, p.stream>>>(p, t, v);
  } else if (scale && p.transpose) {
    rotary_kernel<TIn, T, kVec, true, true, false, Index><<<grid, kThreads, 0, p.stream>>>(p, t, v);
  } else if (scale) {
    rotary_kernel<TIn, T, kVec, true, false, false, Index><<<grid, kThreads, 0, p.stream>>>(p, t, v);
  } else if (p.transpose) {
    rotary_kernel<TIn, T, kVec, false, true, false, Index><<<grid, kThreads, 0, p.stream>>>(p, t, v);
  } else {
    rotary_kernel<TIn, T, kVec, false, false, false, Index><<<grid, kThreads, 0, p.stream>>>(p, t, v);
  }
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

template <typename TIn, typename T, int kVec>
void launch_typed(const RotaryParams& p, int64_t rows) {
  const int64_t vectors = p.head_dim / 2 / kVec;
  const int64_t total = rows * vectors;
  // 32-bit indices when every thread index and every row position fits.
  if (total + kThreads <= INT32_MAX && p.n * (p.head_dim / 2) <= INT32_MAX) {
    launch_indexed<TIn, T, kVec, uint32_t>(p, total, vectors);
  } else {
    launch_indexed<TIn, T, kVec, int64_t>(p, total, vectors);
  }
}

template <typename TIn, typename T>
void launch_dtype(const RotaryParams& p, int64_t rows) {
  // 16-byte vectors of out (16 or 32 bytes of x) where every row and both halves start on a vector boundary; single
  // elements otherwise.
  constexpr int kVec = 16 / sizeof(T);
  bool vectorized = (p.head_dim / 2) % kVec == 0 && aligned(p.x, kVec * sizeof(TIn)) && aligned(p.out, 16);
  for (const float* table : {p.cos, p.sin, p.scale}) vectorized = vectorized && (table == nullptr || aligned(table, 16));
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
