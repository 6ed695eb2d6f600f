// Fused dilated attention backward for Hopper (sm_90a): fused_dilated.cu's backward (one branch per launch, P and dS
// recomputed from the merged LSE and delta = rowsum(dout·out), which makes each branch's gradient exact for the whole
// mix; float32 accumulators shared by the branches) with its five products on wgmma and its loads on TMA. D = 64.
//
// CTA: a tile of 128 keys of one segment and head, 2 warpgroups × 64 keys; it walks the segment's query rows in
// tiles of 128 (double-buffered Q, dout, LSE and delta). Per query tile, each warpgroup computes, in two halves of 64
// queries so that one half's exponentials run while the tensor cores work on the other's products,
//   S^T = K·Q^T and dP^T = V·dout^T    (64 × 128, both operands K-major in shared memory)
//   P^T = exp2(S^T·scale·log2e − lse_log2), dS^T = P^T ∘ (dP^T − delta)    (in registers)
//   dV += P^T·dout, dK += dS^T·Q       (A from registers, the accumulator's layout; B N-major in shared memory)
// and writes dS^T to shared memory as two [key][64 queries] tiles in the 128-byte swizzle; after a CTA barrier
// warpgroup i takes query half i: dQ = dS·K with dS and K both read transposed (M- and N-major), and adds it to the
// float32 dq accumulator by TMA reductions. dK and dV go to theirs once, at the end. The key tile covers its keys'
// whole gradient for the branch, so only dq, summed over the key tiles of a segment, is added once per query tile.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/sm90.cuh"

namespace longnet::attention::kernels::fused {
namespace {

constexpr int kKeys = kTileRows, kQueries = kTileRows, kThreads = 256;
// K, V, 2 stages of Q and dout, dS^T (two halves), dQ (16 KB a warpgroup), 2 stages of LSE and delta, the key
// flags, 3 mbarriers (K and V; Q and dout of each stage), and slack to align the tiles to 1024 bytes.
constexpr int kSmemBytes = 10 * kTileBytes + 4 * kQueries * 4 + kKeys + 3 * 8 + 1024;

// The TMA views of q, k, v and dout for one branch (sm90.cuh).
struct BwdViews : QkvViews {
  TmaView dout;
  TmaView dq;  // the float32 dq accumulator, for the TMA reductions
};

#if defined(LONGNET_SM90_WGMMA)
// P^T and dS^T of one half of a query tile (64 queries from tile-local column q0) rounded into A fragments: entry
// (nt, e) of the accumulators is key `key` + 8·(e >> 1) and query column q0 + 8·nt + 2c + (e & 1). The fragments are
// packed as soon as a pair of n-tiles is done, so that the float scores die early (register pressure). kMasked adds
// the per-entry tests (dropped keys, the causal diagonal) that most tiles do not need.
template <typename T, bool kMasked>
__device__ __forceinline__ void gradients_of_scores(float (&s)[8][4], float (&dp)[8][4], uint32_t (&pa)[4][4],
                                                    uint32_t (&da)[4][4], const float* lse, const float* delta,
                                                    int q0, float scale_log2, int c, const bool (&dropped)[2],
                                                    bool diagonal, int key, int m0) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int nt = 2 * kk; nt < 2 * kk + 2; ++nt) {
      const int col = q0 + nt * 8 + 2 * c;
      const float2 l = *reinterpret_cast<const float2*>(lse + col);
      const float2 d = *reinterpret_cast<const float2*>(delta + col);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pr = exp2_ftz(fmaf(s[nt][e], scale_log2, -((e & 1) ? l.y : l.x)));
        if constexpr (kMasked) {
          if (dropped[e >> 1] || (diagonal && key + (e >> 1) * 8 > m0 + col + (e & 1))) pr = 0.f;
        }
        dp[nt][e] = pr * (dp[nt][e] - ((e & 1) ? d.y : d.x));
        s[nt][e] = pr;
      }
    }
    a_from_accumulator<T>(pa[kk], s, kk);
    a_from_accumulator<T>(da[kk], dp, kk);
  }
}

// Writes dS^T fragments (as gradients_of_scores leaves them) into a [key][64 queries] tile in the 128-byte swizzle:
// word j of da[kk] is key key_a + 8·(j & 1), queries 16·kk + 8·(j >> 1) + 2c, +1.
__device__ __forceinline__ void store_scores_t(uint32_t tile, const uint32_t (&da)[4][4], int key_a, int c) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int key = key_a + 8 * (j & 1), col = 16 * kk + 8 * (j >> 1);
      const uint32_t addr = tile + swizzle<kD>(key, col >> 3) * 2 + 4 * c;
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(da[kk][j]) : "memory");
    }
  }
}
#endif  // LONGNET_SM90_WGMMA

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    fused_bwd_sm90_kernel(const FusedDilatedParams p, const __grid_constant__ BwdViews views) {
#if defined(LONGNET_SM90_WGMMA)
  using W = Wgmma<T>;
  constexpr uint32_t kRowBytes = kD * 2;  // one swizzled row of a tile
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t sK = smem_addr(smem), sV = sK + kTileBytes;
  const uint32_t sQ = sV + kTileBytes;       // 2 stages
  const uint32_t sO = sQ + 2 * kTileBytes;   // 2 stages of dout
  const uint32_t sS = sO + 2 * kTileBytes;   // dS^T: queries [0, 64) then [64, 128), rows = keys
  const uint32_t sQd = sS + 2 * kTileBytes;  // dQ of warpgroup i at i·16 KB: two boxes of 64 rows × 32 floats
  float* sLse = reinterpret_cast<float*>(smem + 10 * kTileBytes);  // 2 stages of lse_log2
  float* sDelta = sLse + 2 * kQueries;                             // 2 stages
  uint8_t* sDrop = reinterpret_cast<uint8_t*>(sDelta + 2 * kQueries);
  const uint32_t bar_kv = smem_addr(sDrop + kKeys), bar_qo = bar_kv + 8;  // bar_qo: 2 stages

  Branch br;
  int k0 = 0;
  if (!locate(p, tiles_per_segment(p, kKeys), kKeys, br, k0)) return;
  const int L = br.L;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, c = lane & 3;

  const TmaRows rows(p, br);
  const int o = rows.o, g0 = rows.g0, view = rows.view, batch = rows.batch, head = rows.head, kv_head = rows.kv_head;
  const int64_t stat = (br.b * p.heads + br.h) * p.n + br.first;  // lse_log2 / delta of sparse row 0

  // Query tile m0 into a stage: Q and dout by TMA (thread 0); the tile's LSE (threads < 128) or delta (the others)
  // is returned for store_stat to put in the stage once the load has arrived (storing at once would stall the
  // thread on it). +inf and 0 past L make those rows' probabilities and gradients 0 whatever rows the box brought.
  auto load_queries = [&](int m0, int stage) {
    if (tid == 0) {
      mbarrier_expect(bar_qo + 8 * stage, 2 * kTileBytes);
      tma_load(sQ + stage * kTileBytes, views.q[view], head, o, g0 + m0, batch, bar_qo + 8 * stage);
      tma_load(sO + stage * kTileBytes, views.dout[view], head, o, g0 + m0, batch, bar_qo + 8 * stage);
    }
    const int row = m0 + (tid & (kQueries - 1));
    const int64_t at = stat + static_cast<int64_t>(row) * p.r;
    if (tid < kQueries) return row < L ? p.lse_log2[at] : INFINITY;
    return row < L ? p.delta[at] : 0.f;
  };
  auto store_stat = [&](int stage, float value) {
    (tid < kQueries ? sLse : sDelta - kQueries)[stage * kQueries + tid] = value;
  };

  if (tid == 0) {
    for (int i = 0; i < 3; ++i) mbarrier_init(bar_kv + 8 * i);
    fence_mbarrier_init();
  }
  __syncthreads();  // barriers initialised before anyone arms or waits on them
  if (tid == 0) {
    mbarrier_expect(bar_kv, 2 * kTileBytes);
    tma_load(sK, views.k[view], kv_head, o, g0 + k0, batch, bar_kv);
    tma_load(sV, views.v[view], kv_head, o, g0 + k0, batch, bar_kv);
  }
  bool drop = false;
  if (tid < kKeys) {
    const int key = k0 + tid;
    drop = key >= L ||
           (p.key_padding != nullptr && p.key_padding[br.b * p.n + br.first + static_cast<int64_t>(key) * p.r]);
    sDrop[tid] = drop;
  }
  // Causal: queries before the key tile see none of its keys.
  const int m_begin = p.causal ? k0 : 0;
  store_stat(0, load_queries(m_begin, 0));

  float dk[kD / 8][4] = {}, dv[kD / 8][4] = {};
  const float scale_log2 = p.scale * kLog2e;
  const int key_a = wg * 64 + warp * 16 + g;  // tile-local key of accumulator entries 0, 1 (entries 2, 3: +8)
  const uint32_t k_rows = sK + wg * 64 * kRowBytes, v_rows = sV + wg * 64 * kRowBytes;  // the warpgroup's keys
  const bool any_dropped = __syncthreads_or(drop) != 0;  // and the key flags and stage 0's LSE and delta are written
  const bool dropped[2] = {sDrop[key_a] != 0, sDrop[key_a + 8] != 0};
  mbarrier_wait(bar_kv, 0);

  int it = 0;
  for (int m0 = m_begin; m0 < L; m0 += kQueries, ++it) {
    // Stage (it + 1) & 1 was last read in iteration it - 1, which every thread has left (the barrier at its end).
    const bool has_next = m0 + kQueries < L;
    const float next_stat = has_next ? load_queries(m0 + kQueries, (it + 1) & 1) : 0.f;
    const int stage = it & 1;
    const uint32_t q_addr = sQ + stage * kTileBytes, o_addr = sO + stage * kTileBytes;
    const float* lse = sLse + stage * kQueries;
    const float* delta = sDelta + stage * kQueries;

    // S^T = K·Q^T and dP^T = V·dout^T in two groups, one per half of the queries, so that the first half's
    // exponentials run while the tensor cores work on the second: four k-steps of 16 along D, 32 bytes apart inside
    // the swizzled rows; the second half's Q and dout rows start 64 rows (8192 bytes) into the tiles.
    mbarrier_wait(bar_qo + 8 * stage, (it >> 1) & 1);
    constexpr uint32_t kHalf = 64 * kRowBytes;
    float s0[8][4], d0[8][4], s1[8][4], d1[8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) W::ss_n64(s0, smem_desc(k_rows + kk * 32), smem_desc(q_addr + kk * 32), kk);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) W::ss_n64(d0, smem_desc(v_rows + kk * 32), smem_desc(o_addr + kk * 32), kk);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      W::ss_n64(s1, smem_desc(k_rows + kk * 32), smem_desc(q_addr + kHalf + kk * 32), kk);
    }
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      W::ss_n64(d1, smem_desc(v_rows + kk * 32), smem_desc(o_addr + kHalf + kk * 32), kk);
    }
    wgmma_commit();

    // Per half: P^T and dS^T, dS^T to shared memory for dQ, then dV += P^T·dout and dK += dS^T·Q (four k-steps of
    // 16 queries, 16 rows = 2048 bytes apart), which run while the next half's exponentials do.
    const bool masked = any_dropped || (p.causal && m0 < k0 + kKeys);
    const int key = k0 + key_a;
    auto half_gradients = [&](float (&s)[8][4], float (&dp)[8][4], uint32_t (&pa)[4][4], uint32_t (&da)[4][4],
                              int half) {
      if (masked) {
        gradients_of_scores<T, true>(s, dp, pa, da, lse, delta, 64 * half, scale_log2, c, dropped, p.causal, key, m0);
      } else {
        gradients_of_scores<T, false>(s, dp, pa, da, lse, delta, 64 * half, scale_log2, c, dropped, p.causal, key,
                                      m0);
      }
      store_scores_t(sS + half * kTileBytes, da, key_a, c);
      if (half == 0) {  // the accumulators, before the first products that write them
        pin(dv);
        pin(dk);
      }
      pin(pa);
      pin(da);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) W::rs_n64(dv, pa[kk], smem_desc(o_addr + half * kHalf + kk * 16 * kRowBytes));
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) W::rs_n64(dk, da[kk], smem_desc(q_addr + half * kHalf + kk * 16 * kRowBytes));
      wgmma_commit();
    };
    uint32_t pa0[4][4], da0[4][4], pa1[4][4], da1[4][4];
    wgmma_wait<1>();
    pin(s0);
    pin(d0);
    half_gradients(s0, d0, pa0, da0, 0);
    wgmma_wait<1>();  // the second half's scores (the first half's products may still run)
    pin(s1);
    pin(d1);
    half_gradients(s1, d1, pa1, da1, 1);
    fence_proxy_async();
    wgmma_wait<0>();
    pin(dv);
    pin(dk);
    pin(pa0);
    pin(da0);
    pin(pa1);
    pin(da1);
    __syncthreads();  // both halves of dS^T are written

    // dQ for the warpgroup's 64 queries = dS·K: eight k-steps of 16 keys, 16 rows apart in both tiles.
    float dq[kD / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      W::ss_n64_tt(dq, smem_desc(sS + wg * kTileBytes + kk * 16 * kRowBytes), smem_desc(sK + kk * 16 * kRowBytes),
                   kk);
    }
    wgmma_commit();
    wgmma_wait_all();
    pin(dq);
    // dQ to shared memory in the TMA box layout (128-byte swizzle over rows of 32 floats), then one TMA reduction
    // per box into the float32 accumulator: whole lines added in L2, none of the threads' atomics. Rows past L add
    // zeros (their dS is 0) to whatever rows the box covers.
    const uint32_t dq_tile = sQd + wg * kTileBytes;
    const bool issuer = (tid & 127) == 0;
    if (issuer) bulk_wait_read();  // the previous tile's reductions have read the buffer
    warpgroup_sync(wg);
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = warp * 16 + g + 8 * i, chunk = (dt & 3) * 2 + (c >> 1);
        const uint32_t addr = dq_tile + (dt >> 2) * (kTileBytes / 2) + row * 128 + ((chunk ^ (row & 7)) << 4) +
                              (c & 1) * 8;
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(p.scale * dq[dt][2 * i]),
                     "f"(p.scale * dq[dt][2 * i + 1])
                     : "memory");
      }
    }
    fence_proxy_async();
    warpgroup_sync(wg);
    if (issuer) {
      const int row_g = g0 + m0 + wg * 64, acc_head = head - static_cast<int>(p.acc_head0);
      tma_reduce_add(views.dq[view], dq_tile, 0, acc_head, o, row_g, batch);
      tma_reduce_add(views.dq[view], dq_tile + kTileBytes / 2, kD / 2, acc_head, o, row_g, batch);
      bulk_commit();
    }
    if (has_next) store_stat((it + 1) & 1, next_stat);
    __syncthreads();  // the next iteration overwrites dS^T and refills this stage, and reads the next one
  }

  if ((tid & 127) == 0) bulk_wait_read();  // shared memory stays until the last reductions have read it
  add_kv_gradients<kD>(p, br, k0 + key_a, dk, dv, c);
#else
  (void)p;
  (void)views;
#endif
}

}  // namespace

bool launch_sm90_backward(const FusedDilatedParams& p) {
  constexpr const char* what = "launch_fused_dilated_bwd";
  BwdViews views;
  const int64_t dq_strides[3] = {p.n * p.acc_heads * kD, p.acc_heads * kD, kD};
  if (!views.encode(p) || !encode_views(views.dout, p.dout, p.dout_strides, p.heads, p) ||
      !encode_views(views.dq, p.dq_acc, dq_strides, p.acc_heads, p, ViewKind::accumulator)) {
    return false;
  }
  const dim3 grid = grid_for(p, kKeys, what);
  launch_by_dtype(fused_bwd_sm90_kernel<__nv_bfloat16>, fused_bwd_sm90_kernel<__half>, grid, kThreads, kSmemBytes,
                  p, views);
  return true;
}

}  // namespace longnet::attention::kernels::fused
