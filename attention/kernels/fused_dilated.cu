// Fused dilated attention (LongNet §2.2) on tensor cores: mma.sync m16n8k16 with float32 accumulation, ldmatrix
// from XOR-swizzled shared memory, cp.async gathers of the dilated rows (each row of q/k/v is a contiguous 16-byte
// aligned run of D elements, so a dilated gather costs the same as a dense load). Runs on sm_80 and later.
//
// Geometry of one launch (one branch w, r): CTA (segment × head, tile, batch). Inside segment s the branch's rows of
// head h are tokens s·w + o + t·r, t < L, with o = h mod r and L the rows of a possibly ragged last segment; a
// causal mask in the original order is the plain causal mask in t, since the rows keep their order.
//
// Forward (flash-attention 2 style): 4 warps, 32 query rows each, online softmax over key tiles of 64 with K/V
// double-buffered; the epilogue merges the tile's rows into the running (out, lse) by their log-sum-exp. On Hopper
// with D = 64 the launcher runs fused_dilated_sm90.cu's wgmma forward instead (FusedDilatedParams::portable keeps
// this one).
// Backward: 4 warps, 16 keys each, over query tiles of 64: P and dS are recomputed from the merged lse and
// delta = rowsum(dout·out), which makes each branch's gradient exact for the whole mix; dk and dv stay in registers,
// dS goes through shared memory for dq, which is added atomically. On Hopper with D = 64 the launcher runs
// fused_dilated_sm90_bwd.cu's wgmma backward instead (again unless FusedDilatedParams::portable).
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/fused_dilated.h"
#include "attention/kernels/fused_dilated_tiles.cuh"

namespace longnet::attention::kernels {
namespace {

using namespace fused;


// ---- forward -----------------------------------------------------------------------------------------------------

// 4 warps of 16·m-tiles query rows each: two m-tiles share every K/V fragment at D = 64; at D = 128 the registers
// hold one.
constexpr int kFwdKeys = 64, kFwdThreads = 128;
template <int D>
__host__ __device__ constexpr int fwd_m_tiles() {
  return D <= 64 ? 2 : 1;
}
template <int D>
__host__ __device__ constexpr int fwd_rows() {
  return 4 * 16 * fwd_m_tiles<D>();
}

template <int D>
constexpr int fwd_smem_bytes() {
  return (fwd_rows<D>() * D + 4 * kFwdKeys * D) * 2 + 2 * kFwdKeys;
}

template <typename T, int D>
__global__ void __launch_bounds__(kFwdThreads) fused_fwd_kernel(const FusedDilatedParams p) {
  using M = Mma<T>;
  constexpr int MT = fwd_m_tiles<D>(), kFwdRows = fwd_rows<D>();
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kFwdRows * D;  // 2 stages
  T* sV = sK + 2 * kFwdKeys * D;
  uint8_t* sDrop = reinterpret_cast<uint8_t*>(sV + 2 * kFwdKeys * D);  // 2 stages: key out of range or removed

  Branch br;
  int q0 = 0;
  if (!locate(p, tiles_per_segment(p, kFwdRows), kFwdRows, br, q0)) return;
  const int L = br.L;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;

  const ForwardRows<T> rows(p, br, q0);
  const bool* mask = rows.mask;
  const int keys = p.causal ? min(L, q0 + kFwdRows) : L;
  const int tiles = (keys + kFwdKeys - 1) / kFwdKeys;
  auto load_kv = [&](int j) {
    const int stage = j & 1;
    rows.template load_kv<kFwdKeys, D, kFwdThreads>(sK + stage * kFwdKeys * D, sV + stage * kFwdKeys * D,
                                           sDrop + stage * kFwdKeys, j * kFwdKeys, L, tid);
  };

  load_rows<kFwdRows, D, kFwdThreads>(sQ, rows.q, rows.q_row, L - q0, tid);
  load_kv(0);
  cp_async_commit();

  uint32_t qf[MT][D / 16][4];
  float acc[MT][D / 8][4];
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;
  const int warp_row = q0 + warp * 16 * MT;  // first sparse query row of the warp

  for (int j = 0; j < tiles; ++j) {
    if (j + 1 < tiles) load_kv(j + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          ldmatrix_x4(qf[mt][kk], a_operand_addr<D>(sQ, warp * 16 * MT + mt * 16, kk, lane));
        }
      }
    }
    const T* tK = sK + (j & 1) * kFwdKeys * D;
    const T* tV = sV + (j & 1) * kFwdKeys * D;
    const uint8_t* drop = sDrop + (j & 1) * kFwdKeys;
    const int n0 = j * kFwdKeys;

    float s[MT][kFwdKeys / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int i = 0; i < kFwdKeys / 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kFwdKeys / 16; ++np) {
        uint32_t bf[4];
        ldmatrix_x4(bf, b_operand_addr<D>(tK, np * 16, kk, lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          M::run(s[mt][2 * np], qf[mt][kk], bf[0], bf[1]);
          M::run(s[mt][2 * np + 1], qf[mt][kk], bf[2], bf[3]);
        }
      }
    }

    // Masks only where a tile can need them (the ragged end, padding, the causal diagonal): unmasked tiles issue no
    // mask instructions at all.
    if (n0 + kFwdKeys > L || mask != nullptr || (p.causal && n0 + kFwdKeys - 1 > warp_row)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mask_scores(s[mt], drop, p.causal, n0, warp_row + mt * 16 + g, c);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) softmax_step(s[mt], acc[mt], row_max[mt], row_sum[mt], scale_log2);

#pragma unroll
    for (int kk = 0; kk < kFwdKeys / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) a_from_accumulator<T>(a[mt], s[mt], kk);
      mma_by_tile_rows<T, D, MT>(acc, a, tV, kk * 16, lane);
    }
    __syncthreads();
  }

  // Epilogue: merge each row into the running (out, lse) by log-sum-exp.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) merge_rows<T, D>(p, br, warp_row + mt * 16 + g, acc[mt], row_max[mt], row_sum[mt],
                                                   scale_log2, c);
}

// ---- backward ----------------------------------------------------------------------------------------------------

constexpr int kBwdKeys = 64, kBwdRows = 64, kBwdThreads = 128;

template <int D>
constexpr int bwd_smem_bytes() {
  return (2 * kBwdKeys * D + 4 * kBwdRows * D + kBwdKeys * kBwdRows) * 2 + 4 * kBwdRows * 4 + kBwdKeys;
}

template <typename T, int D>
__global__ void __launch_bounds__(kBwdThreads) fused_bwd_kernel(const FusedDilatedParams p) {
  using M = Mma<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBwdKeys * D;
  T* sQ2 = sV + kBwdKeys * D;     // 2 stages of query rows
  T* sO2 = sQ2 + 2 * kBwdRows * D;  // 2 stages of dout rows
  T* sS = sO2 + 2 * kBwdRows * D;   // dS as [key][query], swizzled with 64-element rows
  float* sLse2 = reinterpret_cast<float*>(sS + kBwdKeys * kBwdRows);  // 2 stages
  float* sDelta2 = sLse2 + 2 * kBwdRows;                               // 2 stages
  uint8_t* sDrop = reinterpret_cast<uint8_t*>(sDelta2 + 2 * kBwdRows);

  Branch br;
  int k0 = 0;
  if (!locate(p, tiles_per_segment(p, kBwdKeys), kBwdKeys, br, k0)) return;
  const int L = br.L;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;

  const T* kg = static_cast<const T*>(p.k) + br.b * p.k_strides[0] + (br.first + k0 * p.r) * p.k_strides[1] +
                br.hk * p.k_strides[2];
  const T* vg = static_cast<const T*>(p.v) + br.b * p.v_strides[0] + (br.first + k0 * p.r) * p.v_strides[1] +
                br.hk * p.v_strides[2];
  const T* qg = static_cast<const T*>(p.q) + br.b * p.q_strides[0] + br.first * p.q_strides[1] + br.h * p.q_strides[2];
  const T* og = static_cast<const T*>(p.dout) + br.b * p.dout_strides[0] + br.first * p.dout_strides[1] +
                br.h * p.dout_strides[2];
  const int64_t q_row = p.r * p.q_strides[1], o_row = p.r * p.dout_strides[1];
  const int64_t stat = (br.b * p.heads + br.h) * p.n + br.first;  // lse_log2 / delta of sparse row 0

  load_rows<kBwdKeys, D, kBwdThreads>(sK, kg, p.r * p.k_strides[1], L - k0, tid);
  load_rows<kBwdKeys, D, kBwdThreads>(sV, vg, p.r * p.v_strides[1], L - k0, tid);
  if (tid < kBwdKeys) {
    const int key = k0 + tid;
    sDrop[tid] = key >= L || (p.key_padding != nullptr &&
                              p.key_padding[br.b * p.n + br.first + static_cast<int64_t>(key) * p.r]);
  }

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const float scale_log2 = p.scale * kLog2e;
  const int key_a = warp * 16 + g;  // tile-local key row of accumulator entries 0, 1 (entries 2, 3: +8)

  // Query tiles are double-buffered: tile i + 1 loads while tile i computes.
  auto load_queries = [&](int m0, int stage) {
    load_rows<kBwdRows, D, kBwdThreads>(sQ2 + stage * kBwdRows * D, qg + m0 * q_row, q_row, L - m0, tid);
    load_rows<kBwdRows, D, kBwdThreads>(sO2 + stage * kBwdRows * D, og + m0 * o_row, o_row, L - m0, tid);
    if (tid < kBwdRows) {
      const int row = m0 + tid;
      const bool ok = row < L;
      sLse2[stage * kBwdRows + tid] = ok ? p.lse_log2[stat + static_cast<int64_t>(row) * p.r] : INFINITY;
      sDelta2[stage * kBwdRows + tid] = ok ? p.delta[stat + static_cast<int64_t>(row) * p.r] : 0.f;
    }
  };
  const int m_begin = p.causal ? k0 : 0;
  load_queries(m_begin, 0);
  cp_async_commit();
  for (int m0 = m_begin, stage = 0; m0 < L; m0 += kBwdRows, stage ^= 1) {
    if (m0 + kBwdRows < L) load_queries(m0 + kBwdRows, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* sQ = sQ2 + stage * kBwdRows * D;
    const T* sO = sO2 + stage * kBwdRows * D;
    const float* sLse = sLse2 + stage * kBwdRows;
    const float* sDelta = sDelta2 + stage * kBwdRows;

    // S^T = K Q^T for the warp's 16 keys × 64 queries, then P^T = exp2(S^T·scale·log2e − lse_log2).
    float s[kBwdRows / 8][4], dp[kBwdRows / 8][4];
#pragma unroll
    for (int i = 0; i < kBwdRows / 8; ++i) {
      s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      ldmatrix_x4(ka, a_operand_addr<D>(sK, warp * 16, kk, lane));
      ldmatrix_x4(va, a_operand_addr<D>(sV, warp * 16, kk, lane));
#pragma unroll
      for (int np = 0; np < kBwdRows / 16; ++np) {
        uint32_t bq[4], bo[4];
        ldmatrix_x4(bq, b_operand_addr<D>(sQ, np * 16, kk, lane));
        ldmatrix_x4(bo, b_operand_addr<D>(sO, np * 16, kk, lane));
        M::run(s[2 * np], ka, bq[0], bq[1]);
        M::run(s[2 * np + 1], ka, bq[2], bq[3]);
        M::run(dp[2 * np], va, bo[0], bo[1]);  // dP^T = V dout^T
        M::run(dp[2 * np + 1], va, bo[2], bo[3]);
      }
    }
    const bool diagonal = p.causal && m0 < k0 + kBwdKeys;
    const bool dropped[2] = {sDrop[key_a] != 0, sDrop[key_a + 8] != 0};
#pragma unroll
    for (int nt = 0; nt < kBwdRows / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * c + (e & 1);
        s[nt][e] = dropped[e >> 1] ? 0.f : exp2_ftz(fmaf(s[nt][e], scale_log2, -sLse[col]));
      }
    }
    if (diagonal) {
#pragma unroll
      for (int nt = 0; nt < kBwdRows / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (k0 + key_a + (e >> 1) * 8 > m0 + nt * 8 + 2 * c + (e & 1)) s[nt][e] = 0.f;
        }
      }
    }
    // dV += P^T dout
#pragma unroll
    for (int kk = 0; kk < kBwdRows / 16; ++kk) {
      uint32_t a[4];
      a_from_accumulator<T>(a, s, kk);
      mma_by_tile_rows<T, D, 1>(&dv, &a, sO, kk * 16, lane);
    }
    // dS^T = P^T ∘ (dP^T − delta); dK += dS^T Q; dS^T to shared memory for dQ.
#pragma unroll
    for (int nt = 0; nt < kBwdRows / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= dp[nt][e] - sDelta[nt * 8 + 2 * c + (e & 1)];
    }
#pragma unroll
    for (int kk = 0; kk < kBwdRows / 16; ++kk) {
      uint32_t a[4];
      a_from_accumulator<T>(a, s, kk);
      mma_by_tile_rows<T, D, 1>(&dk, &a, sQ, kk * 16, lane);
    }
#pragma unroll
    for (int nt = 0; nt < kBwdRows / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int key = key_a + i * 8, col = nt * 8 + 2 * c;
        *reinterpret_cast<uint32_t*>(sS + swizzle<kBwdRows>(key, col >> 3) + (col & 7)) =
            M::pack(s[nt][2 * i], s[nt][2 * i + 1]);
      }
    }
    __syncthreads();

    // dQ (the warp's 16 queries) = dS K, read as dS[query][key] through transposed loads of dS^T.
    float dq[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kBwdKeys / 16; ++kk) {
      uint32_t a[4];
      {
        const int key = kk * 16 + (lane & 7) + (lane >> 4) * 8;
        const int chunk = warp * 2 + ((lane >> 3) & 1);
        ldmatrix_x4_trans(a, smem_addr(sS + swizzle<kBwdRows>(key, chunk)));
      }
      mma_by_tile_rows<T, D, 1>(&dq, &a, sK, kk * 16, lane);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = m0 + warp * 16 + g + i * 8;
      if (row >= L) continue;
      const int64_t token = br.first + static_cast<int64_t>(row) * p.r;
      float* dst = p.dq_acc + ((br.b * p.n + token) * p.acc_heads + (br.h - p.acc_head0)) * D + 2 * c;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        atomic_add2(dst + dt * 8, p.scale * dq[dt][2 * i], p.scale * dq[dt][2 * i + 1]);
      }
    }
    __syncthreads();  // the next tile overwrites this stage and sS
  }

  add_kv_gradients<D>(p, br, k0 + key_a, dk, dv, c);
}

// delta = Σ_d dout·out per (b, h, token) and lse·log2(e). kPrepareLanes threads share a row, each taking 16-byte
// chunks, so that a warp's loads cover whole rows (one thread per row strided its loads by a row); a shuffle sums.
constexpr int kPrepareLanes = 8;

template <typename T>
__global__ void bwd_prepare_kernel(const FusedDilatedParams p, float* delta, float* lse_log2) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = t / kPrepareLanes;  // (b, token, h)
  const int part = static_cast<int>(t % kPrepareLanes);
  const bool live = row < p.batch * p.n * p.heads;  // every lane still reaches the shuffles
  const int64_t h = row % p.heads, token = (row / p.heads) % p.n, b = row / (p.heads * p.n);
  float sum = 0.f;
  if (live) {
    const T* o = static_cast<const T*>(p.out) + b * p.out_strides[0] + token * p.out_strides[1] + h * p.out_strides[2];
    const T* d = static_cast<const T*>(p.dout) + b * p.dout_strides[0] + token * p.dout_strides[1] +
                 h * p.dout_strides[2];
    for (int64_t i = 8 * part; i < p.head_dim; i += 8 * kPrepareLanes) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + i), dv = *reinterpret_cast<const uint4*>(d + i);
      const uint32_t* ow = reinterpret_cast<const uint32_t*>(&ov);
      const uint32_t* dw = reinterpret_cast<const uint32_t*>(&dv);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = Mma<T>::unpack(ow[e]), y = Mma<T>::unpack(dw[e]);
        sum += x.x * y.x + x.y * y.y;
      }
    }
  }
#pragma unroll
  for (int lanes = kPrepareLanes / 2; lanes > 0; lanes /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, lanes);
  if (!live || part != 0) return;
  const int64_t s = (b * p.heads + h) * p.n + token;
  delta[s] = sum;
  const float l = p.lse[s];
  lse_log2[s] = l == -INFINITY ? INFINITY : l * kLog2e;
}

// ---- launchers ---------------------------------------------------------------------------------------------------

void check_common(const FusedDilatedParams& p, const char* what) {
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr) {
    throw std::invalid_argument(std::string(what) + ": q, k and v must be device pointers");
  }
  if (!fused_dilated_supports_head_dim(p.head_dim)) {
    throw std::invalid_argument(std::string(what) + ": head_dim " + std::to_string(p.head_dim) +
                                " is not compiled (64 or 128)");
  }
  if (p.w < 1 || p.r < 1 || p.head_lo < 0 || p.head_hi > p.heads || p.head_lo > p.head_hi || p.kv_heads < 1 ||
      p.heads % p.kv_heads != 0) {
    throw std::invalid_argument(std::string(what) + ": bad branch or heads");
  }
}

// launch(T{}) for the element type: bf16 or fp16 (the tensor-core path has no float32).
template <typename Launch>
void by_dtype(const FusedDilatedParams& p, const char* what, Launch&& launch) {
  switch (p.dtype) {
    case ElementType::bfloat16: launch(__nv_bfloat16{}); break;
    case ElementType::float16: launch(__half{}); break;
    case ElementType::float32: throw std::invalid_argument(std::string(what) + ": float32 inputs are not supported");
  }
}

// launch(T{}, std::integral_constant<int, D>{}) for the element type and a compiled head dim.
template <typename Launch>
void by_dtype_and_dim(const FusedDilatedParams& p, const char* what, Launch&& launch) {
  by_dtype(p, what, [&](auto t) {
    if (p.head_dim == 64) {
      launch(t, std::integral_constant<int, 64>{});
    } else {
      launch(t, std::integral_constant<int, 128>{});
    }
  });
}

int current_device() {
  int device = 0;
  LONGNET_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

}  // namespace

bool fused_dilated_supports_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

bool fused_dilated_fwd_on_hopper(int64_t head_dim, int device) {
  return fused::sm90_kernels_available(head_dim, device);
}

void launch_fused_dilated_fwd(const FusedDilatedParams& params) {
  check_common(params, "launch_fused_dilated_fwd");
  if (params.out == nullptr || params.lse == nullptr) {
    throw std::invalid_argument("launch_fused_dilated_fwd: out and lse must be device pointers");
  }
  if (params.n == 0 || params.batch == 0 || params.head_hi == params.head_lo) return;
  if (!params.portable && fused_dilated_fwd_on_hopper(params.head_dim, current_device()) &&
      fused::launch_sm90_forward(params)) {
    return;
  }
  constexpr const char* what = "launch_fused_dilated_fwd";
  by_dtype_and_dim(params, what, [&](auto t, auto dim) {
    constexpr int D = decltype(dim)::value;
    launch_kernel(fused_fwd_kernel<decltype(t), D>, grid_for(params, fwd_rows<D>(), what), kFwdThreads,
                  fwd_smem_bytes<D>(), params);
  });
}

void launch_fused_dilated_bwd_prepare(const FusedDilatedParams& params, float* delta, float* lse_log2) {
  if (params.out == nullptr || params.dout == nullptr || params.lse == nullptr || delta == nullptr ||
      lse_log2 == nullptr || params.head_dim % 8 != 0) {
    throw std::invalid_argument("launch_fused_dilated_bwd_prepare: missing pointers or head_dim not a multiple of 8");
  }
  const int64_t threads = params.batch * params.n * params.heads * kPrepareLanes;
  if (threads == 0) return;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  by_dtype(params, "launch_fused_dilated_bwd_prepare", [&](auto t) {
    bwd_prepare_kernel<decltype(t)><<<blocks, kThreads, 0, params.stream>>>(params, delta, lse_log2);
  });
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

void launch_fused_dilated_bwd(const FusedDilatedParams& params) {
  check_common(params, "launch_fused_dilated_bwd");
  if (params.dout == nullptr || params.lse_log2 == nullptr || params.delta == nullptr || params.dq_acc == nullptr ||
      params.dk_acc == nullptr || params.dv_acc == nullptr) {
    throw std::invalid_argument("launch_fused_dilated_bwd: dout, lse_log2, delta and the accumulators must be set");
  }
  if (params.n == 0 || params.batch == 0 || params.head_hi == params.head_lo) return;
  if (!params.portable && fused::sm90_kernels_available(params.head_dim, current_device()) &&
      fused::launch_sm90_backward(params)) {
    return;
  }
  constexpr const char* what = "launch_fused_dilated_bwd";
  by_dtype_and_dim(params, what, [&](auto t, auto dim) {
    constexpr int D = decltype(dim)::value;
    launch_kernel(fused_bwd_kernel<decltype(t), D>, grid_for(params, kBwdKeys, what), kBwdThreads, bwd_smem_bytes<D>(),
                  params);
  });
}

}  // namespace longnet::attention::kernels
