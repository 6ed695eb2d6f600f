// grad_gather: the flash backward's dq, dk and dv from its calls' gradients.
//
// The backward used to add each call's three gradients into float32 accumulators and round them at the end: per
// element a float32 write (or zero fill), a read and write per further call, and a read to round, 57 ms of GPU time
// in three steps of the video_text_gpu training profile on an H100. Here a thread owns kVec consecutive elements of
// one output row, finds the row in each call (a few integer operations, the same for every element of the row), and
// sums the calls' 16-byte vectors in registers: one read of each call's gradients and one write of the output.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/elementwise.cuh"
#include "attention/kernels/grad_gather.h"

namespace longnet::attention::kernels {
namespace {

using namespace elementwise;

constexpr int kThreads = 256;

// Whether call c attended row (b, n) of query head h, and where: its (ib, s, j, i) in the call's row grid.
__device__ __forceinline__ bool locate(const GradCall& c, int32_t b, int32_t n, int32_t h, int64_t (&index)[4]) {
  const int32_t ib = b - c.b0;
  if (ib < 0 || ib >= c.nb) return false;
  const int32_t dh = h - c.head0;
  if (dh < 0) return false;
  const int32_t j = dh / c.head_step;
  if (j * c.head_step != dh || j >= c.heads) return false;
  const int32_t t = n - c.first_token;
  if (t < 0 || t >= c.ns * c.seg_len) return false;
  const int32_t s = t / c.seg_len;
  const int32_t q = t - s * c.seg_len - c.o - j * c.offset_step;
  if (q < 0) return false;
  const int32_t i = q / c.r;
  if (i * c.r != q || i >= c.rows) return false;
  index[0] = ib;
  index[1] = s;
  index[2] = j;
  index[3] = i;
  return true;
}

// kAll: one thread writes dq, dk and dv of query head h (group = 1). Otherwise tensors [t0, t0 + count) of output
// head `hout`, each summing the query heads hout·group + g of its group (dq: count 1, group 1; dk, dv: group G).
template <typename T, int kVec, int kCount>
__global__ void __launch_bounds__(kThreads) grad_gather_kernel(const GradGatherParams p, int t0, int32_t out_heads,
                                                               int32_t group, int64_t total, int64_t vectors) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (gid >= total) return;
  const int64_t v = gid % vectors;
  int64_t row = gid / vectors;
  const auto hout = static_cast<int32_t>(row % out_heads);
  row /= out_heads;
  const auto n = static_cast<int32_t>(row % p.tokens);
  const auto b = static_cast<int32_t>(row / p.tokens);
  float sum[kCount][kVec];
#pragma unroll
  for (int t = 0; t < kCount; ++t) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum[t][e] = 0.f;
  }
  for (int32_t g = 0; g < group; ++g) {
    const int32_t h = p.first_head + hout * group + g;
    float head_sum[kCount][kVec];  // this query head's terms, summed in call order before the group's sum
#pragma unroll
    for (int t = 0; t < kCount; ++t) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) head_sum[t][e] = 0.f;
    }
    for (int32_t ci = 0; ci < p.num_calls; ++ci) {
      const GradCall& c = p.calls[ci];
      int64_t index[4];
      if (!locate(c, b, n, h, index)) continue;
#pragma unroll
      for (int t = 0; t < kCount; ++t) {
        const T* grad = static_cast<const T*>(c.grad[t0 + t]) + offset_of(index, c.grad_strides[t0 + t]) + v * kVec;
        const Vec<T, kVec> x = *reinterpret_cast<const Vec<T, kVec>*>(grad);
#pragma unroll
        for (int e = 0; e < kVec; ++e) head_sum[t][e] += to_float(x.v[e]);
      }
    }
#pragma unroll
    for (int t = 0; t < kCount; ++t) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum[t][e] = g == 0 ? head_sum[t][e] : sum[t][e] + head_sum[t][e];
    }
  }
#pragma unroll
  for (int t = 0; t < kCount; ++t) {
    const int64_t* st = p.out_strides[t0 + t];
    Vec<T, kVec> y;
#pragma unroll
    for (int e = 0; e < kVec; ++e) y.v[e] = from_float<T>(sum[t][e]);
    *reinterpret_cast<Vec<T, kVec>*>(static_cast<T*>(p.out[t0 + t]) + b * st[0] + n * st[1] + hout * st[2] +
                                     v * kVec) = y;
  }
}

template <typename T, int kVec, int kCount>
void launch_part(const GradGatherParams& p, int t0, int32_t out_heads, int32_t group) {
  const int64_t vectors = p.head_dim / kVec;
  const int64_t total = p.batch * p.tokens * out_heads * vectors;
  if (total == 0) return;
  const unsigned grid = grid_for("launch_grad_gather", total, kThreads);
  grad_gather_kernel<T, kVec, kCount><<<grid, kThreads, 0, p.stream>>>(p, t0, out_heads, group, total, vectors);
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kVec>
void launch_vec(const GradGatherParams& p) {
  if (p.group == 1) {
    launch_part<T, kVec, 3>(p, 0, p.heads, 1);
  } else {
    launch_part<T, kVec, 1>(p, 0, p.heads, 1);
    launch_part<T, kVec, 2>(p, 1, p.heads / p.group, p.group);
  }
}

// Whether every call's gradient rows and every output row can move as 16-byte vectors. The calls live in device
// memory, so the launcher is told by the caller (`calls_vectorizable`).
template <typename T>
void launch_dtype(const GradGatherParams& p, bool calls_vectorizable) {
  constexpr int kVec = 16 / sizeof(T);
  bool vectorized = calls_vectorizable && p.head_dim % kVec == 0;
  for (int t = 0; t < 3; ++t) {
    vectorized = vectorized && aligned(p.out[t], 16);
    for (int d = 0; d < 3; ++d) vectorized = vectorized && p.out_strides[t][d] % kVec == 0;
  }
  if (vectorized) {
    launch_vec<T, kVec>(p);
  } else {
    launch_vec<T, 1>(p);
  }
}

}  // namespace

bool grad_call_vectorizable(const GradCall& call, ElementType dtype) {
  const int64_t vec = dtype == ElementType::float32 ? 4 : 8;
  bool ok = true;
  for (int t = 0; t < 3; ++t) {
    ok = ok && call.grad[t] != nullptr && aligned(call.grad[t], 16);
    for (int d = 0; d < 4; ++d) ok = ok && call.grad_strides[t][d] % vec == 0;
  }
  return ok;
}

void launch_grad_gather(const GradGatherParams& params, bool calls_vectorizable) {
  for (int t = 0; t < 3; ++t) {
    if (params.out[t] == nullptr) {
      throw std::invalid_argument("launch_grad_gather: out[" + std::to_string(t) + "] must be a device pointer");
    }
  }
  if (params.num_calls > 0 && params.calls == nullptr) {
    throw std::invalid_argument("launch_grad_gather: calls must be a device pointer");
  }
  elementwise::require_head_dim("launch_grad_gather", params.head_dim);
  if (params.batch < 0 || params.tokens < 0 || params.heads < 0 || params.num_calls < 0 || params.group < 1 ||
      params.heads % params.group != 0) {
    throw std::invalid_argument("launch_grad_gather: needs batch, tokens, heads, num_calls >= 0 and heads a multiple "
                                "of group >= 1, got batch " + std::to_string(params.batch) + ", tokens " +
                                std::to_string(params.tokens) + ", heads " + std::to_string(params.heads) +
                                ", group " + std::to_string(params.group));
  }
  if (params.tokens > INT32_MAX || params.batch > INT32_MAX) {
    throw std::invalid_argument("launch_grad_gather: batch and tokens must fit in 32 bits");
  }
  elementwise::with_element_type(params.dtype, [&](auto element) {
    launch_dtype<decltype(element)>(params, calls_vectorizable);
  });
}

}  // namespace longnet::attention::kernels
