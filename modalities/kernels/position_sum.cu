// position_sum: the learned positions of a 32K-token video took three gathers of (rows, C) float32 tables, two adds
// for their sum and two more for the patch and modality embeddings: seven passes over float32 activations of the
// sample's size. Here a thread owns 4 channels of one row: it reads the row's positions, the 4 channels of h, of the
// modality embedding and of each table row (the tables and the embedding stay in cache), and writes the sum once.
#include <cstdint>
#include <stdexcept>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/elementwise.cuh"
#include "modalities/kernels/position_sum.h"

namespace longnet::modalities::kernels {
namespace {

using namespace attention::kernels::elementwise;

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float4 load4(const T* p) {
  const Vec<T, 4> v = *reinterpret_cast<const Vec<T, 4>*>(p);
  return make_float4(to_float(v.v[0]), to_float(v.v[1]), to_float(v.v[2]), to_float(v.v[3]));
}

template <>
__device__ __forceinline__ float4 load4<float>(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ float4 add4(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

template <typename T, int kAxes>
__global__ void __launch_bounds__(kThreads) position_sum_kernel(const PositionSumParams p, int64_t total) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (gid >= total) return;
  const int64_t quads = p.width / 4;
  const int64_t row = gid / quads, col = (gid % quads) * 4;
  float4 pos = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int a = 0; a < kAxes; ++a) {
    const int64_t index = p.positions[row * p.position_stride + a];
    if (index < 0 || index >= p.table_rows) __trap();  // the host checks ranges first (ModalityEncoder::check_ranges)
    const float4 e = load4(p.tables[a] + index * p.width + col);
    pos = a == 0 ? e : add4(pos, e);
  }
  const float4 h = load4(static_cast<const T*>(p.h) + row * p.width + col);
  const float4 out = add4(add4(h, load4(p.modality + col)), pos);
  *reinterpret_cast<float4*>(p.out + row * p.width + col) = out;
}

template <typename T>
void launch_typed(const PositionSumParams& p) {
  const int64_t total = p.rows * (p.width / 4);
  const auto blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  switch (p.axes) {
    case 1: position_sum_kernel<T, 1><<<blocks, kThreads, 0, p.stream>>>(p, total); break;
    case 2: position_sum_kernel<T, 2><<<blocks, kThreads, 0, p.stream>>>(p, total); break;
    default: position_sum_kernel<T, 3><<<blocks, kThreads, 0, p.stream>>>(p, total); break;
  }
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_position_sum(const PositionSumParams& p) {
  if (p.axes < 1 || p.axes > kMaxPositionAxes || p.width < 4 || p.width % 4 != 0 || p.rows < 0 ||
      p.table_rows < 1 || p.position_stride < p.axes) {
    throw std::invalid_argument("launch_position_sum: needs 1 to 3 axes, a width that is a positive multiple of 4, "
                                "rows >= 0, table_rows >= 1 and a position stride of at least the axes");
  }
  if (p.rows == 0) return;
  const int h_align = p.h_dtype == ElementType::float32 ? 16 : 8;
  bool ok = p.h != nullptr && aligned(p.h, h_align) && p.modality != nullptr && aligned(p.modality, 16) &&
            p.positions != nullptr && p.out != nullptr && aligned(p.out, 16);
  for (int a = 0; a < p.axes; ++a) ok = ok && p.tables[a] != nullptr && aligned(p.tables[a], 16);
  if (!ok) throw std::invalid_argument("launch_position_sum: null or unaligned pointer");
  switch (p.h_dtype) {
    case ElementType::float32: launch_typed<float>(p); break;
    case ElementType::float16: launch_typed<__half>(p); break;
    case ElementType::bfloat16: launch_typed<__nv_bfloat16>(p); break;
  }
}

}  // namespace longnet::modalities::kernels
