// Device building blocks shared by the fused dilated-attention kernels (fused_dilated.cu: mma.sync, sm_80 and later;
// fused_dilated_sm90.cu: wgmma, Hopper): the branch geometry, cp.async gathers into swizzled tiles, fragment
// helpers, the log-sum-exp merge of finished rows into the running output, and the launch helpers. Internal to the
// kernels; the public entry points are in fused_dilated.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/params.h"

namespace longnet::attention::kernels::fused {

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

// dst[0..1] = (a, b) when `store`, else atomic_add2.
__device__ __forceinline__ void add_or_store2(float* dst, float a, float b, bool store) {
  if (store) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else {
    atomic_add2(dst, a, b);
  }
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

// A forward CTA's global views of its branch: query rows from sparse row q0, keys and values from sparse row 0,
// consecutive sparse rows *_row elements apart, and the padding flags of the keys (null without a mask).
template <typename T>
struct ForwardRows {
  const T *q, *k, *v;
  const bool* mask;
  int64_t q_row, k_row, v_row, mask_row;

  __device__ __forceinline__ ForwardRows(const FusedDilatedParams& p, const Branch& br, int q0)
      : q(static_cast<const T*>(p.q) + br.b * p.q_strides[0] + (br.first + q0 * p.r) * p.q_strides[1] +
          br.h * p.q_strides[2]),
        k(static_cast<const T*>(p.k) + br.b * p.k_strides[0] + br.first * p.k_strides[1] + br.hk * p.k_strides[2]),
        v(static_cast<const T*>(p.v) + br.b * p.v_strides[0] + br.first * p.v_strides[1] + br.hk * p.v_strides[2]),
        mask(p.key_padding != nullptr ? p.key_padding + br.b * p.n + br.first : nullptr),
        q_row(p.r * p.q_strides[1]),
        k_row(p.r * p.k_strides[1]),
        v_row(p.r * p.v_strides[1]),
        mask_row(p.r) {}

  // Gathers key/value rows [n0, n0 + kKeys) into one pipeline stage (zero rows past L) and flags the keys that are
  // out of range or removed by the padding mask.
  template <int kKeys, int D, int kThreads>
  __device__ __forceinline__ void load_kv(T* sK, T* sV, uint8_t* drop, int n0, int L, int tid) const {
    load_rows<kKeys, D, kThreads>(sK, k + n0 * k_row, k_row, L - n0, tid);
    load_rows<kKeys, D, kThreads>(sV, v + n0 * v_row, v_row, L - n0, tid);
    if (tid < kKeys) {
      const int key = n0 + tid;
      drop[tid] = key >= L || (mask != nullptr && mask[static_cast<int64_t>(key) * mask_row]);
    }
  }
};

// Sets to -inf the scores of a 16-row fragment (rows row_a, row_a + 8; key columns n0 + 8·nt + 2c, +1) whose key is
// dropped (drop[col]: out of range or padding) or, when causal, after the row.
template <int NT>
__device__ __forceinline__ void mask_scores(float (&s)[NT][4], const uint8_t* drop, bool causal, int n0, int row_a,
                                            int c) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * c + (e & 1);
      if (drop[col] || (causal && n0 + col > row_a + (e >> 1) * 8)) s[nt][e] = -INFINITY;
    }
  }
}

// One online-softmax step of a 16-row fragment: raises the running max by the tile's scores, rescales the
// accumulator and the running sums, and turns the scores into probabilities (rounded later to the A operand).
// Scores stay unscaled until the exponent: max commutes with the positive scale, and the scaling folds into
// exp2(s·scale·log2e − max·scale·log2e), one FFMA.
template <int NT, int DT>
__device__ __forceinline__ void softmax_step(float (&s)[NT][4], float (&acc)[DT][4], float (&row_max)[2],
                                             float (&row_sum)[2], float scale_log2) {
  float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
  }
  float base[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
    // A row without keys so far keeps base 0, so that its probabilities are exp2(-inf) = 0.
    base[i] = tile_max[i] == -INFINITY ? 0.f : tile_max[i] * scale_log2;
    const float correction = exp2_ftz(row_max[i] * scale_log2 - base[i]);
    row_max[i] = tile_max[i];
    row_sum[i] *= correction;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      acc[dt][2 * i] *= correction;
      acc[dt][2 * i + 1] *= correction;
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pr = exp2_ftz(fmaf(s[nt][e], scale_log2, -base[e >> 1]));
      row_sum[e >> 1] += pr;
      s[nt][e] = pr;
    }
  }
}

// Merges a finished 16-row fragment of one branch into the running (out, lse) by log-sum-exp (combine_by_lse's
// formula). The fragment is an mma accumulator (rows row_a = first sparse row + g and row_a + 8, columns 8·dt + 2c,
// +1) with the online softmax's running max (unscaled scores) and the quad-partial sums of its two rows.
template <typename T, int D>
__device__ __forceinline__ void merge_rows(const FusedDilatedParams& p, const Branch& br, int row_a,
                                           const float (&acc)[D / 8][4], const float (&row_max)[2],
                                           float (&row_sum)[2], float scale_log2, int c) {
  float old_lse[2];
  int64_t pos[2];
  bool live[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 1);
    row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 2);
    const int row = row_a + i * 8;
    live[i] = row < br.L && row_sum[i] > 0.f;
    pos[i] = br.first + static_cast<int64_t>(row) * p.r;
    old_lse[i] = live[i] && !p.first ? p.lse[(br.b * p.heads + br.h) * p.n + pos[i]] : -INFINITY;
  }
  __syncwarp();  // every lane has read the old LSE before lane c = 0 writes the new one
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!live[i]) continue;
    const float lse_i = (row_max[i] * scale_log2 + log2f(row_sum[i])) * kLn2;
    float w_old = 0.f, w_new = 1.f / row_sum[i], lse = lse_i;
    if (old_lse[i] > -INFINITY) {
      const float m = fmaxf(old_lse[i], lse_i);
      const float e_old = expf(old_lse[i] - m), e_new = expf(lse_i - m);
      const float sum = e_old + e_new;
      w_old = e_old / sum;
      w_new = e_new / sum / row_sum[i];
      lse = m + logf(sum);
    }
    T* out = static_cast<T*>(p.out) + br.b * p.out_strides[0] + pos[i] * p.out_strides[1] + br.h * p.out_strides[2];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * c);
      float y0 = w_new * acc[dt][2 * i], y1 = w_new * acc[dt][2 * i + 1];
      if (w_old > 0.f) {
        const float2 x = Mma<T>::unpack(*dst);
        y0 += w_old * x.x;
        y1 += w_old * x.y;
      }
      *dst = Mma<T>::pack(y0, y1);
    }
    if (c == 0) p.lse[(br.b * p.heads + br.h) * p.n + pos[i]] = lse;
  }
}

// A backward CTA's dK = scale · Σ dS^T Q and dV = Σ P^T dout into the float32 accumulators: accumulator fragments
// of keys key_a and key_a + 8 (sparse rows of the branch; those ≥ L are skipped), columns 8·dt + 2c, +1. Grouped-query
// heads share kv rows, so they are added atomically, unless the launch is the one that writes them first (kv_store).
template <int D>
__device__ __forceinline__ void add_kv_gradients(const FusedDilatedParams& p, const Branch& br, int key_a,
                                                 const float (&dk)[D / 8][4], const float (&dv)[D / 8][4], int c) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int key = key_a + i * 8;
    if (key >= br.L) continue;
    const int64_t token = br.first + static_cast<int64_t>(key) * p.r;
    const int64_t off = ((br.b * p.n + token) * p.acc_kv_heads + (br.hk - p.acc_kv_head0)) * D + 2 * c;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      add_or_store2(p.dk_acc + off + dt * 8, p.scale * dk[dt][2 * i], p.scale * dk[dt][2 * i + 1], p.kv_store);
      add_or_store2(p.dv_acc + off + dt * 8, dv[dt][2 * i], dv[dt][2 * i + 1], p.kv_store);
    }
  }
}

// ---- launch helpers ----------------------------------------------------------------------------------------------

inline dim3 grid_for(const FusedDilatedParams& p, int rows_per_cta, const char* what) {
  const int64_t segments = (p.n + p.w - 1) / p.w;
  const int64_t x = segments * (p.head_hi - p.head_lo) * tiles_per_segment(p, rows_per_cta);
  if (x > 2147483647LL || p.batch > 65535) {
    throw std::invalid_argument(std::string(what) + ": problem too large for one launch's grid");
  }
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(p.batch));
}

inline void launch_kernel(void (*kernel)(FusedDilatedParams), dim3 grid, int threads, int smem_bytes,
                   const FusedDilatedParams& p) {
  LONGNET_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<grid, threads, smem_bytes, p.stream>>>(p);
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

// The Hopper kernels (fused_dilated_sm90.cu, fused_dilated_sm90_bwd.cu): sm90_kernels_available is true when this
// build has them for the head dim and `device` runs them (compute capability 9.x with the sm_90a target compiled in).
// The launchers return false, having launched nothing, when TMA cannot address an operand (a base address or stride
// not a multiple of 16 bytes); the caller then runs the mma.sync kernel.
bool sm90_kernels_available(int64_t head_dim, int device);
bool launch_sm90_forward(const FusedDilatedParams& p);
bool launch_sm90_backward(const FusedDilatedParams& p);

}  // namespace longnet::attention::kernels::fused
