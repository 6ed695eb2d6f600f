// Fused dilated attention forward for Hopper (sm_90a): the kernel of fused_dilated.cu (one branch per launch,
// online softmax over the branch's keys, log-sum-exp merge into the running output in the epilogue) with its two
// products on wgmma, the warpgroup-wide asynchronous tensor-core instruction; mma.sync cannot reach Hopper's
// tensor-core throughput. D = 64.
//
// CTA: 2 warpgroups × 64 query rows, key tiles of 128. S = Q·K^T reads Q and K from shared memory (both K-major,
// 128-byte rows in the 128-byte swizzle, which is the XOR pattern load_rows writes); O += P·V takes P from registers
// (the S accumulator's layout is the A fragment's) and V as an N-major operand. Two CTAs share an SM, so one's
// softmax overlaps the other's products.
//
// Loads are TMA (the tensor-memory accelerator): one thread issues a whole 128-row tile of Q, K or V per
// instruction, completion is counted on an mbarrier, and the hardware writes the 128-byte swizzle itself. A dilated
// segment's sparse rows are a plain box of a 5-d view of (B, N, H, D): token n = g·r + o splits into g (stride r
// rows) and the offset o (stride 1 row), so the view is (d, head, o, g, batch) and sparse row i of a segment starting
// at token s is g = s/r + i. The threads' only load work left is the keys' drop flags.
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
namespace {

constexpr int kD = 64, kRows = 128, kKeys = 128, kThreads = 256;
constexpr int kTileElems = kKeys * kD;  // a Q, K or V tile (kRows == kKeys)
constexpr uint32_t kTileBytes = kTileElems * 2;
// Q, 2 stages of K and V, the 2 stages' key flags, 5 mbarriers (Q, K and V of each stage), and slack to align the
// tiles to 1024 bytes.
constexpr int kSmemBytes = 5 * kTileBytes + 2 * kKeys + 5 * 8 + 1024;

// The TMA views of q, k and v for one branch. [0] serves head offsets o < n mod r, whose last g holds a real token;
// [1] the others, whose g stops before it. With n a multiple of r the two are the same. The bounds check of each
// coordinate then keeps every box inside the tensor, and rows past it arrive as zeros.
struct TmaViews {
  CUtensorMap q[2], k[2], v[2];
};

#if defined(LONGNET_SM90_WGMMA)
template <typename T>
struct Wgmma;
// ss_n128: D (+)= A·B^T, A (64×16) and B (n×16) both K-major in shared memory; rs_n64: D += A·B, A (64×16)
// in registers (the mma A-fragment layout per warp), B (16×64) N-major in shared memory. PTX names the element type.
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
    asm volatile(                                                                                              \
        "{\n.reg .pred p;\n"                                                                                   \
        "setp.ne.b32 p, %37, 0;\n"                                                                             \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                         \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                               \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                       \
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                       \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                                          \
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                                          \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                                          \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                                          \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                                          \
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                                          \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                                          \
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])                                           \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                                         \
  }                                                                                                            \
};
LONGNET_WGMMA_OPS(__nv_bfloat16, "bf16")
LONGNET_WGMMA_OPS(__half, "f16")
#undef LONGNET_WGMMA_OPS

// Shared-memory matrix descriptor: start address, 128-byte swizzle, 8-row groups 1024 bytes apart. The other
// offset field only matters for layouts wider than one swizzle atom, which these tiles are not; it gets the same.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  constexpr uint64_t kGroup = 1024 >> 4;
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (kGroup << 16) | (kGroup << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

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

#endif  // LONGNET_SM90_WGMMA

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    fused_fwd_sm90_kernel(const FusedDilatedParams p, const __grid_constant__ TmaViews views) {
#if defined(LONGNET_SM90_WGMMA)
  using W = Wgmma<T>;
  extern __shared__ unsigned char smem_raw[];
  // The swizzle pattern repeats every 1024 bytes and TMA and the descriptors assume tiles start on that boundary.
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t sQ = smem_addr(smem);
  const uint32_t sK = sQ + kTileBytes;      // 2 stages
  const uint32_t sV = sK + 2 * kTileBytes;  // 2 stages
  uint8_t* sDrop = smem + 5 * kTileBytes;   // 2 stages: key out of range or removed
  const uint32_t bar_q = smem_addr(sDrop + 2 * kKeys), bar_k = bar_q + 8, bar_v = bar_k + 16;  // K, V: 2 stages

  Branch br;
  int q0 = 0;
  if (!locate(p, tiles_per_segment(p, kRows), kRows, br, q0)) return;
  const int L = br.L;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, c = lane & 3;

  // TMA coordinates of sparse row 0: the head offset o and g0 = (segment start) / r.
  const int o = static_cast<int>(br.h % p.r);
  const int g0 = static_cast<int>((br.first - o) / p.r);
  const int view = o < p.n % p.r ? 0 : 1;
  const int batch = static_cast<int>(br.b), head = static_cast<int>(br.h), kv_head = static_cast<int>(br.hk);
  const bool* mask = p.key_padding != nullptr ? p.key_padding + br.b * p.n + br.first : nullptr;
  const int keys = p.causal ? min(L, q0 + kRows) : L;
  const int tiles = (keys + kKeys - 1) / kKeys;

  // Tile j of K and V into stage j & 1 (thread 0 issues), and the stage's key flags (threads < kKeys).
  auto load_kv = [&](int j) {
    const int stage = j & 1;
    if (tid == 0) {
      mbarrier_expect(bar_k + 8 * stage, kTileBytes);
      tma_load(sK + stage * kTileBytes, views.k[view], kv_head, o, g0 + j * kKeys, batch, bar_k + 8 * stage);
      mbarrier_expect(bar_v + 8 * stage, kTileBytes);
      tma_load(sV + stage * kTileBytes, views.v[view], kv_head, o, g0 + j * kKeys, batch, bar_v + 8 * stage);
    }
    if (tid < kKeys) {
      const int key = j * kKeys + tid;
      sDrop[stage * kKeys + tid] = key >= L || (mask != nullptr && mask[static_cast<int64_t>(key) * p.r]);
    }
  };
  if (tid == 0) {
    for (int i = 0; i < 5; ++i) mbarrier_init(bar_q + 8 * i);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // barriers initialised before anyone arms or waits on them
  if (tid == 0) {
    mbarrier_expect(bar_q, kTileBytes);
    tma_load(sQ, views.q[view], head, o, g0 + q0, batch, bar_q);
  }
  load_kv(0);

  float o_acc[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  const int warp_row = q0 + wg * 64 + warp * 16;  // first sparse query row of the warp
  const uint32_t q_addr = sQ + wg * 64 * kD * 2;
  __syncthreads();  // tile 0's key flags
  mbarrier_wait(bar_q, 0);

  for (int j = 0; j < tiles; ++j) {
    // Stage (j + 1) & 1 was last read in iteration j - 1, which every thread has left (the barrier at its end).
    if (j + 1 < tiles) load_kv(j + 1);
    const int stage = j & 1;
    const uint32_t parity = (j >> 1) & 1;
    const uint32_t k_addr = sK + stage * kTileBytes, v_addr = sV + stage * kTileBytes;
    const uint8_t* drop = sDrop + stage * kKeys;
    const int n0 = j * kKeys;

    // S = Q·K^T: four k-steps of 16 along D, 32 bytes apart inside the swizzled rows. The first step overwrites s
    // (scale-d 0), so its old values are dead and need no registers across the P·V product.
    mbarrier_wait(bar_k + 8 * stage, parity);
    float s[kKeys / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) W::ss_n128(s, smem_desc(q_addr + kk * 32), smem_desc(k_addr + kk * 32), kk);
    wgmma_commit();
    wgmma_wait_all();
    pin(s);

    if (n0 + kKeys > L || mask != nullptr || (p.causal && n0 + kKeys - 1 > warp_row)) {
      mask_scores(s, drop, p.causal, n0, warp_row + g, c);
    }
    softmax_step(s, o_acc, row_max, row_sum, scale_log2);

    // O += P·V: eight k-steps of 16 keys, 16 rows (2048 bytes) apart in the V tile.
    uint32_t pa[kKeys / 16][4];
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) a_from_accumulator<T>(pa[kk], s, kk);
    mbarrier_wait(bar_v + 8 * stage, parity);
    pin(o_acc);
    pin(pa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) W::rs_n64(o_acc, pa[kk], smem_desc(v_addr + kk * 16 * kD * 2));
    wgmma_commit();
    wgmma_wait_all();
    pin(o_acc);
    pin(pa);
    __syncthreads();  // both warpgroups are done with this stage before the next iteration refills it
  }

  merge_rows<T, kD>(p, br, warp_row + g, o_acc, row_max, row_sum, scale_log2, c);
#else
  (void)p;
  (void)views;
#endif
}

// cuTensorMapEncodeTiled from the driver, without linking libcuda (null when the driver lacks it).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
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

// The 5-d view (d, head, o, g, batch) of a (B, N, heads, D) tensor with strides `strides` (elements; head dim
// stride 1) for the launch's r, with g_rows values of g; boxes of 64 × 1 × 1 × 128 × 1 in the 128-byte swizzle.
// False when TMA cannot address the tensor (alignment, strides), and the caller takes the cp.async kernel.
bool encode_view(CUtensorMap& view, const void* base, const int64_t (&strides)[3], int64_t heads, int64_t g_rows,
                 const FusedDilatedParams& p) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  const int64_t token = strides[1] * 2, row_group = p.r * token;
  const int64_t batch_stride = p.batch == 1 ? row_group * g_rows : strides[0] * 2;  // unused with one sample
  const cuuint64_t dims[5] = {static_cast<cuuint64_t>(kD), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(p.r), static_cast<cuuint64_t>(g_rows),
                              static_cast<cuuint64_t>(p.batch)};
  const int64_t byte_strides[4] = {strides[2] * 2, token, row_group, batch_stride};
  cuuint64_t global_strides[4];
  for (int i = 0; i < 4; ++i) {
    if (byte_strides[i] <= 0 || byte_strides[i] % 16 != 0) return false;
    global_strides[i] = static_cast<cuuint64_t>(byte_strides[i]);
  }
  const cuuint32_t box[5] = {kD, 1, 1, kKeys, 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult rc = encode(&view,
                             p.dtype == ElementType::bfloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                              : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                             5, const_cast<void*>(base), dims, global_strides, box, element_strides,
                             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return rc == CUDA_SUCCESS;
}

}  // namespace

bool sm90_forward_available(int64_t head_dim, int device) {
#if defined(LONGNET_HAVE_SM90A)
  int major = 0;
  LONGNET_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return head_dim == kD && major == 9;
#else
  (void)head_dim;
  (void)device;
  return false;
#endif
}

bool launch_sm90_forward(const FusedDilatedParams& p) {
  constexpr const char* what = "launch_fused_dilated_fwd";
  if (p.n / p.r >= (int64_t{1} << 31) || p.batch >= (int64_t{1} << 31)) return false;  // TMA coordinates are int32
  TmaViews views;
  const int64_t g_full = (p.n + p.r - 1) / p.r, g_short = p.n / p.r > 0 ? p.n / p.r : 1;
  auto encode = [&](int i, int64_t g_rows) {
    return encode_view(views.q[i], p.q, p.q_strides, p.heads, g_rows, p) &&
           encode_view(views.k[i], p.k, p.k_strides, p.kv_heads, g_rows, p) &&
           encode_view(views.v[i], p.v, p.v_strides, p.kv_heads, g_rows, p);
  };
  if (!encode(0, g_full)) return false;
  if (g_short == g_full) {  // n a multiple of r (the usual case): the two views are the same maps
    views.q[1] = views.q[0];
    views.k[1] = views.k[0];
    views.v[1] = views.v[0];
  } else if (!encode(1, g_short)) {
    return false;
  }
  const dim3 grid = grid_for(p, kRows, what);
  auto launch = [&](auto kernel) {
    LONGNET_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    kernel<<<grid, kThreads, kSmemBytes, p.stream>>>(p, views);
    LONGNET_CUDA_CHECK(cudaGetLastError());
  };
  if (p.dtype == ElementType::bfloat16) {
    launch(fused_fwd_sm90_kernel<__nv_bfloat16>);
  } else {
    launch(fused_fwd_sm90_kernel<__half>);
  }
  return true;
}

}  // namespace longnet::attention::kernels::fused
