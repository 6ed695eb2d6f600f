// Hopper (sm_90a) building blocks of the fused dilated-attention kernels (fused_dilated_sm90.cu, the forward;
// fused_dilated_sm90_bwd.cu, the backward): wgmma products on 64-row operands in the 128-byte swizzle, mbarriers and
// TMA loads of a branch's sparse rows, and the host side of those TMA views. Internal to the kernels.
//
// A dilated segment's sparse rows are a plain box of a 5-d view of (B, N, H, D): token n = g·r + o splits into g
// (stride r rows) and the offset o (stride 1 row), so the view is (d, head, o, g, batch) and sparse row i of a
// segment starting at token s is g = s/r + i. A box is 128 such rows of D = 64, written by the hardware in the
// 128-byte swizzle, which is the XOR pattern of swizzle<64> in fused_dilated_tiles.cuh.
#pragma once

#include <cstdint>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/fused_dilated_tiles.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LONGNET_SM90_WGMMA 1
#endif

namespace longnet::attention::kernels::fused {

constexpr int kD = 64, kTileRows = 128;
constexpr uint32_t kTileBytes = kTileRows * kD * 2;  // one box: 128 rows of D 16-bit elements

// The TMA views of one (B, N, heads, D) tensor for one branch. [0] serves head offsets o < n mod r, whose last g holds
// a real token; [1] the others, whose g stops before it. With n a multiple of r the two are the same. The bounds
// check of each coordinate then keeps every box inside the tensor, and rows past it arrive as zeros.
using TmaView = CUtensorMap[2];

#if defined(LONGNET_SM90_WGMMA)
template <typename T>
struct Wgmma;
// The 32 accumulator registers of an m64n64 product, as operands %0–%31.
#define LONGNET_WGMMA_N64_D                                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                    \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define LONGNET_WGMMA_N64_OUT(d)                                                                               \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),     \
      "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), \
      "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), \
      "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
      "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
// An m64n64 product with both operands in shared memory; TRANS ("0" or "1") is the transpose flag of both.
#define LONGNET_WGMMA_SS_N64(PTX, NAME, TRANS)                                                                 \
  static __device__ __forceinline__ void NAME(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate) {      \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " " LONGNET_WGMMA_N64_D             \
                 ", %32, %33, p, 1, 1, " TRANS ", " TRANS ";\n}\n"                                             \
                 : LONGNET_WGMMA_N64_OUT(d)                                                                    \
                 : "l"(a), "l"(b), "r"(accumulate));                                                           \
  }
// ss_n128: D (+)= A·B^T, A (64×16) and B (n×16) both K-major in shared memory; ss_n64: the same with n = 64;
// rs_n64: D += A·B, A (64×16) in registers (the mma A-fragment layout per warp), B (16×64) N-major in shared memory;
// ss_n64_tt: D (+)= A·B with A (64×16) M-major and B (16×64) N-major, both in shared memory (tiles of rows along k,
// read transposed). PTX names the element type.
#define LONGNET_WGMMA_OPS(T, PTX)                                                                              \
template <>                                                                                                    \
struct Wgmma<T> {                                                                                              \
  static __device__ __forceinline__ void ss_n128(float (&d)[16][4], uint64_t a, uint64_t b, int accumulate) {  \
    asm volatile(                                                                                              \
        "{\n.reg .pred p;\n"                                                                                   \
        "setp.ne.b32 p, %66, 0;\n"                                                                             \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {"                                        \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                               \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                     \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                     \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                       \
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                                     \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                                          \
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                                          \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                                          \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                                          \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                                          \
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                                          \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                                          \
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),                                          \
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                                          \
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),                                          \
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),                                      \
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),                                      \
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),                                      \
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),                                      \
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),                                      \
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])                                       \
        : "l"(a), "l"(b), "r"(accumulate));                                                                    \
  }                                                                                                            \
  static __device__ __forceinline__ void rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {        \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                  \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " " LONGNET_WGMMA_N64_D             \
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                               \
                 : LONGNET_WGMMA_N64_OUT(d)                                                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                                \
  }                                                                                                            \
  LONGNET_WGMMA_SS_N64(PTX, ss_n64, "0")                                                                       \
  LONGNET_WGMMA_SS_N64(PTX, ss_n64_tt, "1")                                                                    \
};
LONGNET_WGMMA_OPS(__nv_bfloat16, "bf16")
LONGNET_WGMMA_OPS(__half, "f16")
#undef LONGNET_WGMMA_OPS
#undef LONGNET_WGMMA_SS_N64
#undef LONGNET_WGMMA_N64_OUT
#undef LONGNET_WGMMA_N64_D

// Shared-memory matrix descriptor: start address, 128-byte swizzle, 8-row groups 1024 bytes apart. The other
// offset field only matters for layouts wider than one swizzle atom, which these tiles are not; it gets the same.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  constexpr uint64_t kGroup = 1024 >> 4;
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (kGroup << 16) | (kGroup << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Waits until at most `kPending` committed groups of this warpgroup are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Pins registers an in-flight wgmma reads or writes: the compiler may not move their uses across this point.
template <int N>
__device__ __forceinline__ void pin(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
  }
}
template <int N>
__device__ __forceinline__ void pin(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
  }
}

__device__ __forceinline__ void mbarrier_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar));
}
// Arms the barrier's phase for `bytes` of TMA writes (this thread's arrival is the one the phase waits for).
__device__ __forceinline__ void mbarrier_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
}
// One box of `view` at coordinates (0, head, o, g, batch) into shared memory at dst; completion counts on bar.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap& view, int head, int o, int g, int batch,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
      "%6}], [%7];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(&view)), "r"(0), "r"(head), "r"(o), "r"(g), "r"(batch), "r"(bar)
      : "memory");
}

// Adds a float32 box of shared memory at src into `view` at (d0, head, o, g, batch) (TMA reduction in L2); completion
// is tracked per thread by bulk groups.
__device__ __forceinline__ void tma_reduce_add(const CUtensorMap& view, uint32_t src, int d0, int head, int o, int g,
                                               int batch) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.5d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3, %4, %5}], [%6];\n" ::"l"(
          reinterpret_cast<uint64_t>(&view)),
      "r"(d0), "r"(head), "r"(o), "r"(g), "r"(batch), "r"(src)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until this thread's bulk groups have finished reading their shared memory.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Synchronises the 128 threads of warpgroup `wg` (named barrier 1 + wg; 0 is __syncthreads').
__device__ __forceinline__ void warpgroup_sync(int wg) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
}

// A CTA's TMA coordinates of its branch's sparse row 0: the head offset o, g0 = (segment start) / r, which of a
// tensor's two views serves o (TmaView), and the batch, query head and kv head.
struct TmaRows {
  int o, g0, view, batch, head, kv_head;
  __device__ __forceinline__ TmaRows(const FusedDilatedParams& p, const Branch& br)
      : o(static_cast<int>(br.h % p.r)),
        g0(static_cast<int>((br.first - o) / p.r)),
        view(o < p.n % p.r ? 0 : 1),
        batch(static_cast<int>(br.b)),
        head(static_cast<int>(br.h)),
        kv_head(static_cast<int>(br.hk)) {}
};

// Orders this thread's earlier shared-memory writes before later reads by the async proxy (wgmma, TMA): each
// writer runs it before the barrier that precedes the reading wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

#endif  // LONGNET_SM90_WGMMA

// cuTensorMapEncodeTiled from the driver, without linking libcuda (null when the driver lacks it).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                             &found);
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
               : nullptr;
  }();
  return encode;
}

// The element type and box of a view: the kernels' 16-bit operands in boxes of 64 × 128 rows, or a float32
// accumulator in boxes of 32 × 64 rows (128-byte rows either way, the widest the 128-byte swizzle takes).
enum class ViewKind { operand, accumulator };

// The 5-d view (d, head, o, g, batch) of a (B, N, heads, D) tensor with strides `strides` (elements; head dim
// stride 1) for the launch's r, with g_rows values of g, in the 128-byte swizzle. False when TMA cannot address the
// tensor (alignment, strides), and the caller takes the mma.sync kernel.
inline bool encode_view(CUtensorMap& view, const void* base, const int64_t (&strides)[3], int64_t heads,
                        int64_t g_rows, const FusedDilatedParams& p, ViewKind kind = ViewKind::operand) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  const int64_t bytes = kind == ViewKind::operand ? 2 : 4;
  const int64_t token = strides[1] * bytes, row_group = p.r * token;
  const int64_t batch_stride = p.batch == 1 ? row_group * g_rows : strides[0] * bytes;  // unused with one sample
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(kD), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(p.r), static_cast<cuuint64_t>(g_rows),
                              static_cast<cuuint64_t>(p.batch)};
  const int64_t byte_strides[4] = {strides[2] * bytes, token, row_group, batch_stride};
  cuuint64_t global_strides[4];
  for (int i = 0; i < 4; ++i) {
    if (byte_strides[i] <= 0 || byte_strides[i] % 16 != 0) return false;
    global_strides[i] = static_cast<cuuint64_t>(byte_strides[i]);
  }
  const bool operand = kind == ViewKind::operand;
  const cuuint32_t box[5] = {static_cast<cuuint32_t>(operand ? kD : kD / 2), 1, 1,
                             static_cast<cuuint32_t>(operand ? kTileRows : kTileRows / 2), 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUtensorMapDataType type = kind == ViewKind::accumulator ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                   : p.dtype == ElementType::bfloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                      : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult rc = encode(&view, type, 5, const_cast<void*>(base), dims, global_strides, box, element_strides,
                             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return rc == CUDA_SUCCESS;
}

// Both views of a tensor (see TmaView); false when TMA cannot address it.
inline bool encode_views(TmaView& views, const void* base, const int64_t (&strides)[3], int64_t heads,
                         const FusedDilatedParams& p, ViewKind kind = ViewKind::operand) {
  const int64_t g_full = (p.n + p.r - 1) / p.r, g_short = p.n / p.r > 0 ? p.n / p.r : 1;
  if (!encode_view(views[0], base, strides, heads, g_full, p, kind)) return false;
  if (g_short == g_full) {  // n a multiple of r (the usual case): the two views are the same map
    views[1] = views[0];
    return true;
  }
  return encode_view(views[1], base, strides, heads, g_short, p, kind);
}

// The TMA views of a branch's q, k and v. encode is false, having encoded nothing usable, when TMA cannot address one
// of them or its int32 coordinates cannot reach every row; the caller then runs the mma.sync kernel.
struct QkvViews {
  TmaView q, k, v;

  bool encode(const FusedDilatedParams& p) {
    if (p.n / p.r >= (int64_t{1} << 31) || p.batch >= (int64_t{1} << 31)) return false;
    return encode_views(q, p.q, p.q_strides, p.heads, p) && encode_views(k, p.k, p.k_strides, p.kv_heads, p) &&
           encode_views(v, p.v, p.v_strides, p.kv_heads, p);
  }
};

// Launches kernel<__nv_bfloat16> or kernel<__half> by p.dtype, with `smem_bytes` of dynamic shared memory.
template <typename Views>
void launch_by_dtype(void (*bf16)(FusedDilatedParams, Views), void (*half)(FusedDilatedParams, Views), dim3 grid,
                     int threads, int smem_bytes, const FusedDilatedParams& p, const Views& views) {
  const auto kernel = p.dtype == ElementType::bfloat16 ? bf16 : half;
  LONGNET_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<grid, threads, smem_bytes, p.stream>>>(p, views);
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

}  // namespace longnet::attention::kernels::fused
