// combine_by_lse (LongNet §2.2): mixes branch outputs by their softmax denominators, in place and on strided views.
//
// Launch shape: a group of `lanes` threads (a power of two ≤ 32, so a group never straddles a warp) owns one row;
// each lane moves 16-byte vectors along the head dimension. Every lane reads the row's two LSEs before the warp
// synchronises and lane 0 writes the merged LSE after it, so the in-place update has no read-after-write race.
// Memory-bound: one read of out and out_i and one write of out per row (≈3 passes over the branch's rows).
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/elementwise.cuh"
#include "attention/kernels/lse_combine.h"

namespace longnet::attention::kernels {
namespace {

using namespace elementwise;

constexpr int kThreads = 256;

// ---- kernels -----------------------------------------------------------------------------------------------------

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) lse_combine_fwd_kernel(const LseCombineParams p, int64_t total_rows,
                                                                    int lanes) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = gid / lanes;
  const int lane = static_cast<int>(gid % lanes);
  const bool active = row < total_rows;

  bool take = false;
  float w_run = 0.f, w_new = 1.f, lse_out = 0.f;
  int64_t lse_off = 0;
  if (active) {
    int64_t index[4];
    row_index(row, p.rows, index);

    lse_off = offset_of(index, p.lse_strides);
    const float l_run = p.lse[lse_off];
    const float l_new = p.lse_i[offset_of(index, p.lse_i_strides)];
    // -inf (no keys) and NaN (what a fused kernel may return for a row whose keys were all masked) add nothing.
    take = l_new > -INFINITY;
    if (take) {
      lse_out = l_new;
      if (l_run > -INFINITY) {
        const float m = fmaxf(l_run, l_new);
        const float e_run = expf(l_run - m), e_new = expf(l_new - m);
        const float sum = e_run + e_new;  // in [1, 2]: no overflow, no cancellation
        w_run = e_run / sum;
        w_new = e_new / sum;
        lse_out = m + logf(sum);
      }
      T* out = static_cast<T*>(p.out) + offset_of(index, p.out_strides);
      const T* out_i = static_cast<const T*>(p.out_i) + offset_of(index, p.out_i_strides);
      const int64_t vectors = p.head_dim / kVec;
      for (int64_t v = lane; v < vectors; v += lanes) {
        const Vec<T, kVec> x_new = reinterpret_cast<const Vec<T, kVec>*>(out_i)[v];
        Vec<T, kVec> y;
        if (w_run > 0.f) {
          const Vec<T, kVec> x_run = reinterpret_cast<const Vec<T, kVec>*>(out)[v];
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            y.v[e] = from_float<T>(w_run * to_float(x_run.v[e]) + w_new * to_float(x_new.v[e]));
          }
        } else {
          // The running row is empty (zeros): take the branch row as is, without reading the old one.
          y = x_new;
        }
        reinterpret_cast<Vec<T, kVec>*>(out)[v] = y;
      }
    }
  }
  __syncwarp();  // every lane of the row has read the old LSE
  if (active && take && lane == 0) p.lse[lse_off] = lse_out;
}

// ---- launchers ---------------------------------------------------------------------------------------------------

template <typename T, int kVec>
void launch_typed(const LseCombineParams& p, int64_t total_rows) {
  const int64_t vectors = p.head_dim / kVec;
  int lanes = 1;
  while (lanes < 32 && lanes < vectors) lanes *= 2;
  const unsigned grid = grid_for("launch_lse_combine_fwd", total_rows * lanes, kThreads);
  lse_combine_fwd_kernel<T, kVec><<<grid, kThreads, 0, p.stream>>>(p, total_rows, lanes);
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_dtype(const LseCombineParams& p, int64_t total_rows) {
  constexpr int kVec = 16 / sizeof(T);
  bool vectorized = p.head_dim % kVec == 0 && aligned(p.out, 16) && aligned(p.out_i, 16);
  for (int d = 0; d < 4; ++d) {
    vectorized = vectorized && p.out_strides[d] % kVec == 0 && p.out_i_strides[d] % kVec == 0;
  }
  if (vectorized) {
    launch_typed<T, kVec>(p, total_rows);
  } else {
    launch_typed<T, 1>(p, total_rows);
  }
}

}  // namespace

void launch_lse_combine_fwd(const LseCombineParams& params) {
  if (params.out == nullptr || params.out_i == nullptr || params.lse == nullptr || params.lse_i == nullptr) {
    throw std::invalid_argument("launch_lse_combine_fwd: out, out_i, lse and lse_i must be device pointers");
  }
  elementwise::require_head_dim("launch_lse_combine_fwd", params.head_dim);
  const int64_t total_rows = elementwise::row_count("launch_lse_combine_fwd", params.rows);
  if (total_rows == 0) return;
  elementwise::with_element_type(params.dtype, [&](auto element) {
    launch_dtype<decltype(element)>(params, total_rows);
  });
}

}  // namespace longnet::attention::kernels
