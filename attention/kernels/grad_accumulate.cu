// grad_accumulate: the flash backward's scatter of one call's dq, dk and dv into float32 accumulators.
//
// torch's strided add_ ran one launch per gradient with a generic 4-d offset calculator and no vector loads: 57 ms of
// GPU time in three steps of the video_text_gpu training profile, against 34 ms this way. Here one launch handles all
// three: a thread owns kVec consecutive elements of one row, computes the row's offsets once and moves 16-byte vectors
// of the gradient and float32 vectors of the accumulator. Memory-bound: one read of each gradient and one read and
// write of each accumulator (no read with `assign`).
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/elementwise.cuh"
#include "attention/kernels/grad_accumulate.h"

namespace longnet::attention::kernels {
namespace {

using namespace elementwise;

constexpr int kThreads = 256;

template <typename T, int kVec, bool kAssign>
__global__ void __launch_bounds__(kThreads) grad_accumulate_kernel(const GradAccumulateParams p, int64_t total,
                                                                   int64_t vectors) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (gid >= total) return;
  const int64_t v = gid % vectors;
  int64_t index[4];
  row_index(gid / vectors, p.rows, index);
  const int64_t acc_off = offset_of(index, p.acc_strides) + v * kVec;
#pragma unroll
  for (int t = 0; t < 3; ++t) {
    const T* grad = static_cast<const T*>(p.grad[t]) + offset_of(index, p.grad_strides[t]) + v * kVec;
    const Vec<T, kVec> g = *reinterpret_cast<const Vec<T, kVec>*>(grad);
    Vec<float, kVec> a;
    if constexpr (!kAssign) a = *reinterpret_cast<const Vec<float, kVec>*>(p.acc[t] + acc_off);
#pragma unroll
    for (int e = 0; e < kVec; ++e) a.v[e] = (kAssign ? 0.f : a.v[e]) + to_float(g.v[e]);
    *reinterpret_cast<Vec<float, kVec>*>(p.acc[t] + acc_off) = a;
  }
}

template <typename T, int kVec>
void launch_typed(const GradAccumulateParams& p, int64_t total_rows) {
  const int64_t vectors = p.head_dim / kVec;
  const int64_t total = total_rows * vectors;
  const unsigned grid = grid_for("launch_grad_accumulate", total, kThreads);
  if (p.assign) {
    grad_accumulate_kernel<T, kVec, true><<<grid, kThreads, 0, p.stream>>>(p, total, vectors);
  } else {
    grad_accumulate_kernel<T, kVec, false><<<grid, kThreads, 0, p.stream>>>(p, total, vectors);
  }
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_dtype(const GradAccumulateParams& p, int64_t total_rows) {
  // 16-byte gradient vectors: the float32 side then moves two 16-byte vectors (bf16/fp16) or one (float32).
  constexpr int kVec = 16 / sizeof(T);
  bool vectorized = p.head_dim % kVec == 0;
  for (int t = 0; t < 3; ++t) {
    vectorized = vectorized && aligned(p.grad[t], 16) && aligned(p.acc[t], 4 * kVec);
    for (int d = 0; d < 4; ++d) vectorized = vectorized && p.grad_strides[t][d] % kVec == 0;
  }
  for (int d = 0; d < 4; ++d) vectorized = vectorized && p.acc_strides[d] % kVec == 0;
  if (vectorized) {
    launch_typed<T, kVec>(p, total_rows);
  } else {
    launch_typed<T, 1>(p, total_rows);
  }
}

}  // namespace

void launch_grad_accumulate(const GradAccumulateParams& params) {
  for (int t = 0; t < 3; ++t) {
    if (params.acc[t] == nullptr || params.grad[t] == nullptr) {
      throw std::invalid_argument("launch_grad_accumulate: acc[" + std::to_string(t) + "] and grad[" +
                                  std::to_string(t) + "] must be device pointers");
    }
  }
  elementwise::require_head_dim("launch_grad_accumulate", params.head_dim);
  const int64_t total_rows = elementwise::row_count("launch_grad_accumulate", params.rows);
  if (total_rows == 0) return;
  elementwise::with_element_type(params.dtype, [&](auto element) {
    launch_dtype<decltype(element)>(params, total_rows);
  });
}

}  // namespace longnet::attention::kernels
