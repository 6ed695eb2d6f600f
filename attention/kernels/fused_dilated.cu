// Fused dilated attention (LongNet §2.2) on tensor cores: mma.sync m16n8k16 with float32 accumulation, ldmatrix
// from XOR-swizzled shared memory, cp.async gathers of the dilated rows (each row of q/k/v is a contiguous 16-byte
// aligned run of D elements, so a dilated gather costs the same as a dense load). Runs on sm_80 and later.
//
// Geometry of one launch (one branch w, r): CTA (segment × head, tile, batch). Inside segment s the branch's rows of
// head h are tokens s·w + o + t·r, t < L, with o = h mod r and L the rows of a possibly ragged last segment; a
// causal mask in the original order is the plain causal mask in t, since the rows keep their order.
//
// Forward (flash-attention 2 style): 4 warps, 32 query rows each, online softmax over key tiles of 64 with K/V
// double-buffered; the epilogue merges the tile's rows into the running (out, lse) by their log-sum-exp.
// Backward: 4 warps, 16 keys each, over query tiles of 64: P and dS are recomputed from the merged lse and
// delta = rowsum(dout·out), which makes each branch's gradient exact for the whole mix; dk and dv stay in registers,
// dS goes through shared memory for dq, which is added atomically.
#include <algorithm>
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

namespace longnet::attention::kernels {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- primitives --------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared; zero-filled when !valid (src must still be a mapped address).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 2^x with flush-to-zero: one MUFU.EX2, where exp2f adds denormal handling around it.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// dst[0] += a, dst[1] += b (dst 8-byte aligned): one vector atomic on Hopper, which halves the atomic traffic of
// the backward's float32 accumulators; two scalar ones before it.
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    return __half22float2(*reinterpret_cast<const __half2*>(&x));
  }
};

// Shared tiles are row-major with rows of D elements; the 16-byte chunk c of row i lives at chunk c ^ (i mod 8), so
// the 8 rows an ldmatrix phase reads fall in 8 different bank groups.
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Gathers `kRows` rows (row i at src + i·row_stride) into a swizzled tile; rows ≥ valid are zero-filled.
template <int kRows, int D, int kThreads, typename T>
__device__ __forceinline__ void load_rows(T* tile, const T* src, int64_t row_stride, int valid, int tid) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int idx = tid; idx < kRows * kChunks; idx += kThreads) {
    const int row = idx / kChunks, chunk = idx % kChunks;
    const bool ok = row < valid;
    const T* from = ok ? src + row * row_stride + chunk * 8 : src;
    cp_async16(smem_addr(tile + swizzle<D>(row, chunk)), from, ok);
  }
}

// Address for ldmatrix of a 16×16 block at (row0, col0 = 16·k16) read as an mma A operand (matrices: rows 0–7 /
// 8–15 × cols 0–7, then cols 8–15), or, with `trans`, as the B operand of a row-major [k][n] operand.
template <int D>
__device__ __forceinline__ uint32_t a_operand_addr(const void* tile, int row0, int k16, int lane) {
  const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int chunk = k16 * 2 + (lane >> 4);
  return smem_addr(static_cast<const char*>(tile) + swizzle<D>(row, chunk) * 2);
}
// Address for ldmatrix of two n-tiles (rows row0..row0+15 of a row-major [n][k] tile) × 16 of k: the B operands of
// n-tiles row0/8 and row0/8 + 1 (matrices: rows 0–7 × k 0–7, k 8–15, rows 8–15 × k 0–7, k 8–15).
template <int D>
__device__ __forceinline__ uint32_t b_operand_addr(const void* tile, int row0, int k16, int lane) {
  const int row = row0 + (lane & 7) + (lane >> 4) * 8;
  const int chunk = k16 * 2 + ((lane >> 3) & 1);
  return smem_addr(static_cast<const char*>(tile) + swizzle<D>(row, chunk) * 2);
}

// acc[m] (16 × D) += a[m] (16 × 16) · tile[row0, row0 + 16) × [0, D) for m < MT, where `tile` is a row-major
// [k][n] shared tile read by transposed loads; each B fragment serves all MT products.
template <typename T, int D, int MT>
__device__ __forceinline__ void mma_by_tile_rows(float (*acc)[D / 8][4], const uint32_t (*a)[4], const void* tile,
                                                 int row0, int lane) {
#pragma unroll
  for (int dd = 0; dd < D / 16; ++dd) {
    uint32_t bf[4];
    ldmatrix_x4_trans(bf, a_operand_addr<D>(tile, row0, dd, lane));
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      Mma<T>::run(acc[m][2 * dd], a[m], bf[0], bf[1]);
      Mma<T>::run(acc[m][2 * dd + 1], a[m], bf[2], bf[3]);
    }
  }
}

// The A operand for columns [16·kk, 16·kk + 16) of a 16-row product held as accumulator fragments s[n-tile][4],
// rounded to T (an accumulator's layout is the A operand's, two n-tiles at a time).
template <typename T, int NT>
__device__ __forceinline__ void a_from_accumulator(uint32_t (&a)[4], const float (&s)[NT][4], int kk) {
  a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
  a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
  a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

struct Branch {
  int64_t b, h, hk, first;  // batch, query head, kv head, token of sparse row 0
  int L;                    // sparse rows of this segment
};

// The CTA's segment, head and tile (blockIdx.x = ((segment · heads) + head) · tiles + tile, so the tiles of one
// segment and head run back to back and share its keys in L2); false when the segment has no row of this head's
// offset or the tile starts past its rows.
__device__ __forceinline__ bool locate(const FusedDilatedParams& p, int64_t tiles, int tile_rows, Branch& br,
                                       int& row0) {
  const int64_t nh = p.head_hi - p.head_lo;
  const int64_t x = blockIdx.x;
  row0 = static_cast<int>(x % tiles) * tile_rows;
  const int64_t rest = x / tiles;
  const int64_t seg = rest / nh;
  br.h = p.head_lo + rest % nh;
  br.b = blockIdx.y;
  const int64_t start = seg * p.w;
  const int64_t len = min(p.w, p.n - start);
  const int64_t o = br.h % p.r;
  if (o >= len) return false;
  br.L = static_cast<int>((len - o + p.r - 1) / p.r);
  br.hk = br.h / (p.heads / p.kv_heads);
  br.first = start + o;
  return row0 < br.L;
}

// Tiles of `rows` a segment of the launch's branch needs at most.
__host__ __device__ __forceinline__ int64_t tiles_per_segment(const FusedDilatedParams& p, int rows) {
  const int64_t w = p.w < p.n ? p.w : p.n;
  return ((w + p.r - 1) / p.r + rows - 1) / rows;
}

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

  const T* qg = static_cast<const T*>(p.q) + br.b * p.q_strides[0] + (br.first + q0 * p.r) * p.q_strides[1] +
                br.h * p.q_strides[2];
  const T* kg = static_cast<const T*>(p.k) + br.b * p.k_strides[0] + br.first * p.k_strides[1] + br.hk * p.k_strides[2];
  const T* vg = static_cast<const T*>(p.v) + br.b * p.v_strides[0] + br.first * p.v_strides[1] + br.hk * p.v_strides[2];
  const bool* mask = p.key_padding != nullptr ? p.key_padding + br.b * p.n + br.first : nullptr;
  const int64_t k_row = p.r * p.k_strides[1], v_row = p.r * p.v_strides[1];

  const int keys = p.causal ? min(L, q0 + kFwdRows) : L;
  const int tiles = (keys + kFwdKeys - 1) / kFwdKeys;
  auto load_kv = [&](int j) {
    const int n0 = j * kFwdKeys, stage = j & 1;
    load_rows<kFwdKeys, D, kFwdThreads>(sK + stage * kFwdKeys * D, kg + n0 * k_row, k_row, L - n0, tid);
    load_rows<kFwdKeys, D, kFwdThreads>(sV + stage * kFwdKeys * D, vg + n0 * v_row, v_row, L - n0, tid);
    if (tid < kFwdKeys) {
      const int key = n0 + tid;
      sDrop[stage * kFwdKeys + tid] = key >= L || (mask != nullptr && mask[static_cast<int64_t>(key) * p.r]);
    }
  };

  load_rows<kFwdRows, D, kFwdThreads>(sQ, qg, p.r * p.q_strides[1], L - q0, tid);
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

    // Masks only where a tile can need them (the ragged end, padding, the causal diagonal); the two paths are
    // separate code so that unmasked tiles issue no mask instructions at all.
    const bool masked = n0 + kFwdKeys > L || mask != nullptr || (p.causal && n0 + kFwdKeys - 1 > warp_row);
    if (masked) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row_a = warp_row + mt * 16 + g;  // entries 0, 1; entries 2, 3: row_a + 8
#pragma unroll
        for (int nt = 0; nt < kFwdKeys / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + 2 * c + (e & 1);
            if (drop[col] || (p.causal && n0 + col > row_a + (e >> 1) * 8)) s[mt][nt][e] = -INFINITY;
          }
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      // Scores stay unscaled until the exponent: max commutes with the positive scale, and the scaling folds into
      // exp2(s·scale·log2e − max·scale·log2e), one FFMA.
      float tile_max[2] = {row_max[mt][0], row_max[mt][1]};
#pragma unroll
      for (int nt = 0; nt < kFwdKeys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[mt][nt][e]);
      }
      float base[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
        tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
        // A row without keys so far keeps base 0, so that its probabilities are exp2(-inf) = 0.
        base[i] = tile_max[i] == -INFINITY ? 0.f : tile_max[i] * scale_log2;
        const float correction = exp2_ftz(row_max[mt][i] * scale_log2 - base[i]);
        row_max[mt][i] = tile_max[i];
        row_sum[mt][i] *= correction;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          acc[mt][dt][2 * i] *= correction;
          acc[mt][dt][2 * i + 1] *= correction;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kFwdKeys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pr = exp2_ftz(fmaf(s[mt][nt][e], scale_log2, -base[e >> 1]));
          row_sum[mt][e >> 1] += pr;
          s[mt][nt][e] = pr;
        }
      }
    }

#pragma unroll
    for (int kk = 0; kk < kFwdKeys / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) a_from_accumulator<T>(a[mt], s[mt], kk);
      mma_by_tile_rows<T, D, MT>(acc, a, tV, kk * 16, lane);
    }
    __syncthreads();
  }

  // Epilogue: merge each row into the running (out, lse) by log-sum-exp (combine_by_lse's formula).
  float old_lse[MT][2];
  int64_t pos[MT][2];
  bool live[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row_sum[mt][i] += __shfl_xor_sync(0xffffffffu, row_sum[mt][i], 1);
      row_sum[mt][i] += __shfl_xor_sync(0xffffffffu, row_sum[mt][i], 2);
      const int row = warp_row + mt * 16 + g + i * 8;
      live[mt][i] = row < L && row_sum[mt][i] > 0.f;
      pos[mt][i] = br.first + static_cast<int64_t>(row) * p.r;
      old_lse[mt][i] = live[mt][i] && !p.first ? p.lse[(br.b * p.heads + br.h) * p.n + pos[mt][i]] : -INFINITY;
    }
  }
  __syncwarp();  // every lane has read the old LSE before lane c = 0 writes the new one
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!live[mt][i]) continue;
      const float lse_i = (row_max[mt][i] * scale_log2 + log2f(row_sum[mt][i])) * kLn2;
      float w_old = 0.f, w_new = 1.f / row_sum[mt][i], lse = lse_i;
      if (old_lse[mt][i] > -INFINITY) {
        const float m = fmaxf(old_lse[mt][i], lse_i);
        const float e_old = expf(old_lse[mt][i] - m), e_new = expf(lse_i - m);
        const float sum = e_old + e_new;
        w_old = e_old / sum;
        w_new = e_new / sum / row_sum[mt][i];
        lse = m + logf(sum);
      }
      T* out = static_cast<T*>(p.out) + br.b * p.out_strides[0] + pos[mt][i] * p.out_strides[1] +
               br.h * p.out_strides[2];
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t* dst = reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * c);
        float y0 = w_new * acc[mt][dt][2 * i], y1 = w_new * acc[mt][dt][2 * i + 1];
        if (w_old > 0.f) {
          const float2 x = M::unpack(*dst);
          y0 += w_old * x.x;
          y1 += w_old * x.y;
        }
        *dst = M::pack(y0, y1);
      }
      if (c == 0) p.lse[(br.b * p.heads + br.h) * p.n + pos[mt][i]] = lse;
    }
  }
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

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }
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
      for (int dt = 0; dt < D / 8; ++dt) atomic_add2(dst + dt * 8, p.scale * dq[dt][2 * i], p.scale * dq[dt][2 * i + 1]);
    }
    __syncthreads();  // the next tile overwrites this stage and sS
  }

  // dK = scale · Σ dS^T Q, dV = Σ P^T dout for the CTA's keys (grouped-query heads share kv rows: atomics).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int key = k0 + key_a + i * 8;
    if (key >= L) continue;
    const int64_t token = br.first + static_cast<int64_t>(key) * p.r;
    const int64_t off = ((br.b * p.n + token) * p.acc_kv_heads + (br.hk - p.acc_kv_head0)) * D + 2 * c;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      atomic_add2(p.dk_acc + off + dt * 8, p.scale * dk[dt][2 * i], p.scale * dk[dt][2 * i + 1]);
      atomic_add2(p.dv_acc + off + dt * 8, dv[dt][2 * i], dv[dt][2 * i + 1]);
    }
  }
}

// delta = Σ_d dout·out per (b, h, token) and lse·log2(e): one thread per row.
template <typename T>
__global__ void bwd_prepare_kernel(const FusedDilatedParams p, float* delta, float* lse_log2) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (b, token, h)
  const int64_t rows = p.batch * p.n * p.heads;
  if (row >= rows) return;
  const int64_t h = row % p.heads, token = (row / p.heads) % p.n, b = row / (p.heads * p.n);
  const T* o = static_cast<const T*>(p.out) + b * p.out_strides[0] + token * p.out_strides[1] + h * p.out_strides[2];
  const T* d = static_cast<const T*>(p.dout) + b * p.dout_strides[0] + token * p.dout_strides[1] +
               h * p.dout_strides[2];
  float sum = 0.f;
  for (int64_t i = 0; i < p.head_dim; i += 8) {
    const uint4 ov = *reinterpret_cast<const uint4*>(o + i), dv = *reinterpret_cast<const uint4*>(d + i);
    const uint32_t* ow = reinterpret_cast<const uint32_t*>(&ov);
    const uint32_t* dw = reinterpret_cast<const uint32_t*>(&dv);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 x = Mma<T>::unpack(ow[e]), y = Mma<T>::unpack(dw[e]);
      sum += x.x * y.x + x.y * y.y;
    }
  }
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

dim3 grid_for(const FusedDilatedParams& p, int rows_per_cta, const char* what) {
  const int64_t segments = (p.n + p.w - 1) / p.w;
  const int64_t x = segments * (p.head_hi - p.head_lo) * tiles_per_segment(p, rows_per_cta);
  if (x > 2147483647LL || p.batch > 65535) {
    throw std::invalid_argument(std::string(what) + ": problem too large for one launch's grid");
  }
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(p.batch));
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

void launch_kernel(void (*kernel)(FusedDilatedParams), dim3 grid, int threads, int smem_bytes,
                   const FusedDilatedParams& p) {
  LONGNET_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<grid, threads, smem_bytes, p.stream>>>(p);
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

bool fused_dilated_supports_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

void launch_fused_dilated_fwd(const FusedDilatedParams& params) {
  check_common(params, "launch_fused_dilated_fwd");
  if (params.out == nullptr || params.lse == nullptr) {
    throw std::invalid_argument("launch_fused_dilated_fwd: out and lse must be device pointers");
  }
  if (params.n == 0 || params.batch == 0 || params.head_hi == params.head_lo) return;
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
  const int64_t rows = params.batch * params.n * params.heads;
  if (rows == 0) return;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>((rows + kThreads - 1) / kThreads);
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
  constexpr const char* what = "launch_fused_dilated_bwd";
  by_dtype_and_dim(params, what, [&](auto t, auto dim) {
    constexpr int D = decltype(dim)::value;
    launch_kernel(fused_bwd_kernel<decltype(t), D>, grid_for(params, kBwdKeys, what), kBwdThreads, bwd_smem_bytes<D>(),
                  params);
  });
}

}  // namespace longnet::attention::kernels
