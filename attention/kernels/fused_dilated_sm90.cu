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
// instruction, completion is counted on an mbarrier, and the hardware writes the 128-byte swizzle itself (the 5-d
// views of sm90.cuh make a segment's sparse rows one box). The threads' only load work left is the keys' drop flags.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/sm90.cuh"

namespace longnet::attention::kernels::fused {
namespace {

constexpr int kRows = kTileRows, kKeys = kTileRows, kThreads = 256;
// Q, 2 stages of K and V, the 2 stages' key flags, 5 mbarriers (Q, K and V of each stage), and slack to align the
// tiles to 1024 bytes.
constexpr int kSmemBytes = 5 * kTileBytes + 2 * kKeys + 5 * 8 + 1024;


template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    fused_fwd_sm90_kernel(const FusedDilatedParams p, const __grid_constant__ QkvViews views) {
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

  const TmaRows rows(p, br);
  const int o = rows.o, g0 = rows.g0, view = rows.view, batch = rows.batch, head = rows.head, kv_head = rows.kv_head;
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
    fence_mbarrier_init();
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

}  // namespace

bool sm90_kernels_available(int64_t head_dim, int device) {
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
  QkvViews views;
  if (!views.encode(p)) return false;
  const dim3 grid = grid_for(p, kRows, what);
  launch_by_dtype(fused_fwd_sm90_kernel<__nv_bfloat16>, fused_fwd_sm90_kernel<__half>, grid, kThreads, kSmemBytes,
                  p, views);
  return true;
}

}  // namespace longnet::attention::kernels::fused
