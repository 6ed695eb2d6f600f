// Fused dilated attention forward for Hopper (sm_90a): the kernel of fused_dilated.cu (one branch per launch,
// online softmax over the branch's keys, log-sum-exp merge into the running output in the epilogue) with its two
// products on wgmma, the warpgroup-wide asynchronous tensor-core instruction; mma.sync cannot reach Hopper's
// tensor-core throughput. D = 64.
//
// CTA: 2 warpgroups × 64 query rows, key tiles of 128. S = Q·K^T reads Q and K from shared memory (both K-major,
// 128-byte rows in the 128-byte swizzle, which is the XOR pattern load_rows writes); O += P·V takes P from registers
// (the S accumulator's layout is the A fragment's) and V as an N-major operand. K/V are double-buffered cp.async
// gathers of the dilated rows, as in the portable kernel; two CTAs share an SM, so one's softmax overlaps the
// other's products.
#include <cstdint>

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
// Q, 2 stages of K and V, the 2 stages' key flags, and slack to align the tiles to 1024 bytes.
constexpr int kSmemBytes = 5 * kTileElems * 2 + 2 * kKeys + 1024;

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
// cp.async writes shared memory through the generic proxy; wgmma reads it through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

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

#endif  // LONGNET_SM90_WGMMA

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) fused_fwd_sm90_kernel(const FusedDilatedParams p) {
#if defined(LONGNET_SM90_WGMMA)
  using W = Wgmma<T>;
  extern __shared__ unsigned char smem_raw[];
  // The swizzle pattern repeats every 1024 bytes and the descriptors assume tiles start on that boundary.
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kTileElems;      // 2 stages
  T* sV = sK + 2 * kTileElems;  // 2 stages
  uint8_t* sDrop = reinterpret_cast<uint8_t*>(sV + 2 * kTileElems);  // 2 stages: key out of range or removed

  Branch br;
  int q0 = 0;
  if (!locate(p, tiles_per_segment(p, kRows), kRows, br, q0)) return;
  const int L = br.L;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, c = lane & 3;

  const ForwardRows<T> rows(p, br, q0);
  const bool* mask = rows.mask;
  const int keys = p.causal ? min(L, q0 + kRows) : L;
  const int tiles = (keys + kKeys - 1) / kKeys;
  auto load_kv = [&](int j) {
    const int stage = j & 1;
    rows.template load_kv<kKeys, kD, kThreads>(sK + stage * kTileElems, sV + stage * kTileElems, sDrop + stage * kKeys,
                                      j * kKeys, L, tid);
  };
  load_rows<kRows, kD, kThreads>(sQ, rows.q, rows.q_row, L - q0, tid);
  load_kv(0);
  cp_async_commit();

  float o[kD / 8][4];
#pragma unroll
  for (int i = 0; i < kD / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  const int warp_row = q0 + wg * 64 + warp * 16;  // first sparse query row of the warp
  const uint32_t q_addr = smem_addr(sQ + wg * 64 * kD);

  for (int j = 0; j < tiles; ++j) {
    if (j + 1 < tiles) load_kv(j + 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    const uint32_t k_addr = smem_addr(sK + (j & 1) * kTileElems), v_addr = smem_addr(sV + (j & 1) * kTileElems);
    const uint8_t* drop = sDrop + (j & 1) * kKeys;
    const int n0 = j * kKeys;

    // S = Q·K^T: four k-steps of 16 along D, 32 bytes apart inside the swizzled rows. The first step overwrites s
    // (scale-d 0), so its old values are dead and need no registers across the P·V product.
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
    softmax_step(s, o, row_max, row_sum, scale_log2);

    // O += P·V: eight k-steps of 16 keys, 16 rows (2048 bytes) apart in the V tile.
    uint32_t pa[kKeys / 16][4];
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) a_from_accumulator<T>(pa[kk], s, kk);
    pin(o);
    pin(pa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) W::rs_n64(o, pa[kk], smem_desc(v_addr + kk * 16 * kD * 2));
    wgmma_commit();
    wgmma_wait_all();
    pin(o);
    pin(pa);
    __syncthreads();  // both warpgroups are done with this stage before the next iteration refills it
  }

  merge_rows<T, kD>(p, br, warp_row + g, o, row_max, row_sum, scale_log2, c);
#endif
}

}  // namespace

bool sm90_forward_available(int64_t head_dim) {
#if defined(LONGNET_HAVE_SM90A)
  int device = 0, major = 0;
  LONGNET_CUDA_CHECK(cudaGetDevice(&device));
  LONGNET_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return head_dim == kD && major == 9;
#else
  (void)head_dim;
  return false;
#endif
}

void launch_sm90_forward(const FusedDilatedParams& p) {
  constexpr const char* what = "launch_fused_dilated_fwd";
  const dim3 grid = grid_for(p, kRows, what);
  if (p.dtype == ElementType::bfloat16) {
    launch_kernel(fused_fwd_sm90_kernel<__nv_bfloat16>, grid, kThreads, kSmemBytes, p);
  } else {
    launch_kernel(fused_fwd_sm90_kernel<__half>, grid, kThreads, kSmemBytes, p);
  }
}

}  // namespace longnet::attention::kernels::fused
