// column_sum: at::sum over dim 0 of a (rows, cols) bf16 matrix ran at about 3 TB/s on an H200 (4.8 TB/s peak), and
// the bias gradients of a multimodal training step's linear layers read 14 GB that way; so did a first version of
// this kernel whose blocks each read a 512-byte strip of every row. Here a block reads a run of whole rows, one
// contiguous stretch of memory: each thread owns 8 columns (one 16-byte vector) and sums them in float32 over every
// `lanes`-th row of the run, the lanes meet in shared memory, and the block writes one float32 partial row. The grid
// is one full wave of such blocks. A second kernel sums the partial rows, eight lanes a column, and rounds once. No
// atomics: the result is deterministic.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/column_sum.h"
#include "attention/kernels/cuda_check.h"
#include "attention/kernels/elementwise.cuh"

namespace longnet::attention::kernels {
namespace {

using namespace elementwise;

constexpr int kVec = 8;             // 16-bit elements in a 16-byte load
constexpr int kTargetThreads = 256;  // a block's threads: cols / kVec across a row times the row lanes
constexpr int kUnroll = 2;          // rows a thread has in flight
constexpr int kFinishColumns = 32, kFinishLanes = 8;

struct Shape {
  int vectors, lanes;  // threads across a row, rows read at once
  int threads() const { return vectors * lanes; }
  size_t shared_bytes() const { return lanes > 1 ? sizeof(float) * static_cast<size_t>(lanes) * vectors * kVec : 0; }
};

Shape block_shape(int64_t cols) {
  const int vectors = static_cast<int>(cols / kVec);
  return {vectors, std::max(1, kTargetThreads / vectors)};
}

template <typename T>
__device__ __forceinline__ void accumulate(const Vec<T, kVec>& v, float (&acc)[kVec]) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] += to_float(v.v[e]);
}

// Block (threadIdx.x: the 8-column vector, threadIdx.y: the lane) sums rows [begin, end) of chunk blockIdx.x.
template <typename T>
__global__ void __launch_bounds__(kColumnSumMaxCols / kVec) column_partial_kernel(const T* __restrict__ x,
                                                                                  float* __restrict__ partials,
                                                                                  int64_t rows, int64_t cols,
                                                                                  int64_t per_chunk) {
  const int tx = static_cast<int>(threadIdx.x), lane = static_cast<int>(threadIdx.y);
  const int lanes = static_cast<int>(blockDim.y);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_chunk;
  const int64_t end = begin + per_chunk < rows ? begin + per_chunk : rows;
  float acc[kVec] = {};
  using V = Vec<T, kVec>;
  const T* p = x + static_cast<int64_t>(tx) * kVec;
  int64_t r = begin + lane;
  for (; r + (kUnroll - 1) * lanes < end; r += kUnroll * lanes) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = *reinterpret_cast<const V*>(p + (r + u * lanes) * cols);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) accumulate(v[u], acc);
  }
  for (; r < end; r += lanes) accumulate(*reinterpret_cast<const V*>(p + r * cols), acc);

  float* out = partials + static_cast<int64_t>(blockIdx.x) * cols + static_cast<int64_t>(tx) * kVec;
  if (lanes > 1) {
    // Lane l's element e of vector tx at [l][e][tx]: consecutive threads, consecutive banks.
    extern __shared__ float shared[];
    const int vectors = static_cast<int>(blockDim.x);
#pragma unroll
    for (int e = 0; e < kVec; ++e) shared[(lane * kVec + e) * vectors + tx] = acc[e];
    __syncthreads();
    if (lane != 0) return;
    for (int l = 1; l < lanes; ++l) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += shared[(l * kVec + e) * vectors + tx];
    }
  }
  reinterpret_cast<float4*>(out)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  reinterpret_cast<float4*>(out)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
}

// Thread (j, lane) of a block sums every kFinishLanes-th partial row of column j of the block's kFinishColumns.
template <typename T>
__global__ void __launch_bounds__(kFinishColumns * kFinishLanes)
    column_finish_kernel(const float* __restrict__ partials, T* __restrict__ out, int64_t chunks, int64_t cols) {
  const int j = static_cast<int>(threadIdx.x) % kFinishColumns, lane = static_cast<int>(threadIdx.x) / kFinishColumns;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinishColumns + j;
  float sum = 0.f;
  if (c < cols) {
    for (int64_t k = lane; k < chunks; k += kFinishLanes) sum += partials[k * cols + c];
  }
  __shared__ float lanes[kFinishLanes][kFinishColumns];
  lanes[lane][j] = sum;
  __syncthreads();
  if (lane != 0 || c >= cols) return;
#pragma unroll
  for (int l = 1; l < kFinishLanes; ++l) sum += lanes[l][j];
  out[c] = from_float<T>(sum);
}

// The current device's SM count, read once per device.
int64_t sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices];
  int device = 0;
  LONGNET_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= kMaxDevices) device = 0;
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    LONGNET_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    n = std::max(n, 1);
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Chunks of rows (blocks) that fill the GPU once: as many as the SMs hold at a time.
int64_t chunk_count(int64_t rows, int64_t cols) {
  const Shape s = block_shape(cols);
  int per_sm = 0;
  LONGNET_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, column_partial_kernel<__nv_bfloat16>, s.threads(), s.shared_bytes()));
  return std::clamp<int64_t>(sm_count() * std::max(per_sm, 1), 1, rows);
}

template <typename T>
void launch(const ColumnSumParams& p) {
  const Shape s = block_shape(p.cols);
  const int64_t chunks = chunk_count(p.rows, p.cols), per = (p.rows + chunks - 1) / chunks;
  const auto used = static_cast<unsigned>((p.rows + per - 1) / per);  // chunks with rows (the partial rows written)
  column_partial_kernel<T><<<used, dim3(s.vectors, s.lanes), s.shared_bytes(), p.stream>>>(
      static_cast<const T*>(p.x), p.partials, p.rows, p.cols, per);
  LONGNET_CUDA_CHECK(cudaGetLastError());
  const auto finish = static_cast<unsigned>((p.cols + kFinishColumns - 1) / kFinishColumns);
  column_finish_kernel<T><<<finish, kFinishColumns * kFinishLanes, 0, p.stream>>>(p.partials, static_cast<T*>(p.out),
                                                                                   used, p.cols);
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int64_t column_sum_partial_rows(int64_t rows, int64_t cols) {
  if (rows < 1 || cols < kVec || cols % kVec != 0 || cols > kColumnSumMaxCols) return 0;
  const int64_t chunks = chunk_count(rows, cols), per = (rows + chunks - 1) / chunks;
  return (rows + per - 1) / per;
}

void launch_column_sum(const ColumnSumParams& p) {
  if (p.dtype != ElementType::float16 && p.dtype != ElementType::bfloat16) {
    throw std::invalid_argument("launch_column_sum: dtype must be float16 or bfloat16");
  }
  if (p.rows < 1 || p.cols < kVec || p.cols % kVec != 0 || p.cols > kColumnSumMaxCols) {
    throw std::invalid_argument("launch_column_sum: needs rows >= 1 and cols a multiple of 8 in [8, 8192]");
  }
  if (p.x == nullptr || p.partials == nullptr || p.out == nullptr || !aligned(p.x, 16) || !aligned(p.partials, 16)) {
    throw std::invalid_argument("launch_column_sum: x and partials (16-byte aligned) and out must be set");
  }
  if (p.dtype == ElementType::bfloat16) {
    launch<__nv_bfloat16>(p);
  } else {
    launch<__half>(p);
  }
}

}  // namespace longnet::attention::kernels
