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

// Whether call c attended row (b, n) of query head h, and where: its (ib, s, j, i) in the call's row grid. The
// tests without a division come first: most calls reject most rows (another batch, segment range or head).
__device__ __forceinline__ bool locate(const GradCall& c, int32_t b, int32_t n, int32_t h, int64_t (&index)[4]) {
  const int32_t ib = b - c.b0;
  const int32_t t = n - c.first_token;
  const int32_t dh = h - c.head0;
  if (ib < 0 || ib >= c.nb || t < 0 || t >= c.ns * c.seg_len || dh < 0) return false;
  const int32_t j = dh / c.head_step;
  if (j * c.head_step != dh || j >= c.heads) return false;
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

// A thread sums kPer consecutive kVec-element vectors of one output row (the lookup of the row in each call is then
// shared by kPer vectors): tensors [t0, t0 + kCount) of output head `hout`, each summing the query heads
// hout·group + g of its group (all three with group 1; dq alone, then dk and dv with group G). Index arithmetic is
// 32-bit: the launcher checks that the thread count fits.
template <typename T, int kVec, int kPer, int kCount>
__global__ void __launch_bounds__(kThreads) grad_gather_kernel(const GradGatherParams p, int t0, int32_t out_heads,
                                                               int32_t group, uint32_t total, uint32_t chunks) {
  const uint32_t gid = blockIdx.x * kThreads + threadIdx.x;
  if (gid >= total) return;
  const uint32_t chunk = gid % chunks;
  uint32_t row = gid / chunks;
  const auto hout = static_cast<int32_t>(row % static_cast<uint32_t>(out_heads));
  row /= static_cast<uint32_t>(out_heads);
  const auto tokens = static_cast<uint32_t>(p.tokens);
  const auto n = static_cast<int32_t>(row % tokens);
  const auto b = static_cast<int32_t>(row / tokens);
  const int64_t first = static_cast<int64_t>(chunk) * kPer * kVec;  // element of the row
  float sum[kCount][kPer][kVec] = {};
  // Adds call ci's terms of query head h into acc.
  const auto add_calls = [&](int32_t h, float (&acc)[kCount][kPer][kVec]) {
    for (int32_t ci = 0; ci < p.num_calls; ++ci) {
      const GradCall& c = p.calls[ci];
      int64_t index[4];
      if (!locate(c, b, n, h, index)) continue;
      Vec<T, kVec> x[kCount][kPer];  // every load of the call first, then the sums
#pragma unroll
      for (int t = 0; t < kCount; ++t) {
        const T* grad = static_cast<const T*>(c.grad[t0 + t]) + offset_of(index, c.grad_strides[t0 + t]) + first;
#pragma unroll
        for (int u = 0; u < kPer; ++u) x[t][u] = reinterpret_cast<const Vec<T, kVec>*>(grad)[u];
      }
#pragma unroll
      for (int t = 0; t < kCount; ++t) {
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[t][u][e] += to_float(x[t][u].v[e]);
        }
      }
    }
  };
  if (group == 1) {
    add_calls(p.first_head + hout, sum);
  } else {
    for (int32_t g = 0; g < group; ++g) {
      float head_sum[kCount][kPer][kVec] = {};  // this query head's terms, summed in call order before the group's sum
      add_calls(p.first_head + hout * group + g, head_sum);
#pragma unroll
      for (int t = 0; t < kCount; ++t) {
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) sum[t][u][e] += head_sum[t][u][e];
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kCount; ++t) {
    const int64_t* st = p.out_strides[t0 + t];
    auto* out = reinterpret_cast<Vec<T, kVec>*>(static_cast<T*>(p.out[t0 + t]) + b * st[0] + n * st[1] +
                                                hout * st[2] + first);
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      Vec<T, kVec> y;
#pragma unroll
      for (int e = 0; e < kVec; ++e) y.v[e] = from_float<T>(sum[t][u][e]);
      out[u] = y;
    }
  }
}

template <typename T, int kVec, int kPer, int kCount>
void launch_part(const GradGatherParams& p, int t0, int32_t out_heads, int32_t group) {
  const int64_t chunks = p.head_dim / (kVec * kPer);
  const int64_t total = p.batch * p.tokens * out_heads * chunks;
  if (total == 0) return;
  if (total > INT32_MAX - kThreads) {
    throw std::invalid_argument("launch_grad_gather: " + std::to_string(total) +
                                " threads exceed 32-bit indexing; use fewer heads a chunk");
  }
  const unsigned grid = grid_for("launch_grad_gather", total, kThreads);
  grad_gather_kernel<T, kVec, kPer, kCount><<<grid, kThreads, 0, p.stream>>>(
      p, t0, out_heads, group, static_cast<uint32_t>(total), static_cast<uint32_t>(chunks));
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kVec, int kPer>
void launch_vec(const GradGatherParams& p) {
  if (p.group == 1) {
    launch_part<T, kVec, kPer, 3>(p, 0, p.heads, 1);
  } else {
    launch_part<T, kVec, kPer, 1>(p, 0, p.heads, 1);
    launch_part<T, kVec, kPer, 2>(p, 1, p.heads / p.group, p.group);
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
  if (vectorized && p.head_dim % (2 * kVec) == 0) {
    launch_vec<T, kVec, 2>(p);  // D = 64 in 16-bit: four threads a row
  } else if (vectorized) {
    launch_vec<T, kVec, 1>(p);
  } else {
    launch_vec<T, 1, 1>(p);
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
