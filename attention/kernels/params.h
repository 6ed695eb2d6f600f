// Plain parameter structs shared by the attention CUDA kernels and their torch glue: raw pointers, int64 sizes and
// strides (in elements), flags and a stream. No torch and no CUDA headers, so benchmarks and tests can fill them too.
#pragma once

#include <cstdint>

// The CUDA runtime's own spelling of a stream handle (driver_types.h declares the same alias).
typedef struct CUstream_st* cudaStream_t;

namespace longnet::attention::kernels {

enum class ElementType : int { float32, float16, bfloat16 };

// combine_by_lse: merges one branch's (out_i, lse_i) into the running (out, lse), in place.
//
// Rows are addressed by a 4-d index (i0, i1, i2, i3) of sizes rows[0..3]; every row has head_dim elements along the
// last (contiguous) dimension. With the flash backend's views this is (batch, segment, head, row of segment), but the
// kernel only sees strides, so any strided layout of either operand works without gather copies.
//
//   lse'  = logaddexp(lse, lse_i)
//   out'  = exp(lse - lse') · out + exp(lse_i - lse') · out_i
//
// A row whose lse_i is -inf or NaN (a branch row whose keys were all removed) leaves (out, lse) untouched; a row whose
// running lse is -inf takes (out_i, lse_i) as they are. Arithmetic is float32 whatever the element type.
struct LseCombineParams {
  void* out = nullptr;          // running output, element type `dtype`, strides out_strides (last dim stride 1)
  const void* out_i = nullptr;  // branch output, same element type, strides out_i_strides (last dim stride 1)
  float* lse = nullptr;         // running log-sum-exp, strides lse_strides
  const float* lse_i = nullptr; // branch log-sum-exp, strides lse_i_strides

  int64_t rows[4] = {1, 1, 1, 1};
  int64_t head_dim = 0;
  int64_t out_strides[4] = {0, 0, 0, 0};
  int64_t out_i_strides[4] = {0, 0, 0, 0};
  int64_t lse_strides[4] = {0, 0, 0, 0};
  int64_t lse_i_strides[4] = {0, 0, 0, 0};

  ElementType dtype = ElementType::bfloat16;
  cudaStream_t stream = nullptr;
};

// grad_gather: the flash backward's gradients from its calls' dq, dk and dv, in one pass. Output row (b, n, h) of dq is
// the float32 sum, in call order, of the row of every call that attended it (zero when none did), rounded once to
// `dtype`; dk and dv rows of kv head hk also sum over the `group` query heads hk·group + g that share it. The calls'
// 16-bit gradients are read where the fused backward left them, so there are no float32 accumulators to fill, add
// into and round: one read of each call's gradients and one write of the output.
//
// A call is a 4-d grid (nb, ns, heads, rows) of head_dim-element rows: batch b0 + ib, segment ib of `seg_len` tokens
// from first_token, query head head0 + j·head_step on rows o + j·offset_step + i·r of the segment (the layout of
// flash_backend.cpp's Call).
struct GradCall {
  const void* grad[3] = {nullptr, nullptr, nullptr};  // dq, dk, dv of the call's rows (per query head), `dtype`
  int64_t grad_strides[3][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  int32_t b0 = 0, nb = 0, first_token = 0, seg_len = 1, ns = 0, r = 1, o = 0, rows = 0;
  int32_t head0 = 0, heads = 0, head_step = 1, offset_step = 0;
};

struct GradGatherParams {
  const GradCall* calls = nullptr;  // device memory, `num_calls` of them, in summation order
  int32_t num_calls = 0;
  void* out[3] = {nullptr, nullptr, nullptr};  // dq at query head first_head, dk and dv at kv head first_head / group
  int64_t out_strides[3][3] = {{0, 0, 0}, {0, 0, 0}, {0, 0, 0}};  // (batch, token, head); head_dim contiguous
  int64_t batch = 0, tokens = 0;
  int32_t heads = 0;       // query heads written to dq, from first_head; heads / group kv heads to dk and dv
  int32_t group = 1;       // query heads per kv head
  int32_t first_head = 0;  // absolute index of the first query head (the calls' head0 are absolute)
  int64_t head_dim = 0;

  ElementType dtype = ElementType::bfloat16;
  cudaStream_t stream = nullptr;
};

// rotary: the rotary position encoding of attention/positional.h on (B, N, H, D) rows, in one pass. Pair (i, i + D/2)
// of token n is rotated by the angle whose cosine and sine are cos[n, i] and sin[n, i], then multiplied by
// scale[n, i] (xPos; none when null):
//   out_i = (x_i·c − x_{i+D/2}·s)·z,   out_{i+D/2} = (x_{i+D/2}·c + x_i·s)·z
// `transpose` applies the transposed map, (dx_i, dx_{i+D/2}) = z·(g_i·c + g_{i+D/2}·s, g_{i+D/2}·c − g_i·s), which is
// the gradient. Arithmetic is float32; x and out have element type `dtype`.
struct RotaryParams {
  const void* x = nullptr;
  void* out = nullptr;
  int64_t x_strides[3] = {0, 0, 0};    // (batch, token, head); head dim stride 1
  int64_t out_strides[3] = {0, 0, 0};
  const float* cos = nullptr;  // (N, D/2) float32 contiguous; cos and sin null: out = x (a strided copy)
  const float* sin = nullptr;
  const float* scale = nullptr;  // (N, D/2) or null
  int64_t batch = 0, n = 0, heads = 0, head_dim = 0;
  bool transpose = false;

  ElementType dtype = ElementType::bfloat16;  // out's, and x's unless x_float32
  bool x_float32 = false;                     // x is float32 (an accumulator): converted to dtype in the same pass
  cudaStream_t stream = nullptr;
};

// Fused dilated attention: one branch (w, r) of dilated_attention.h's semantics per launch, in place.
//
// Forward: each query tile of a branch's sparse segment runs one online-softmax pass over the branch's keys and merges
// its rows into the running (out, lse) in the epilogue (the combine_by_lse formula), so no branch output, branch LSE
// or combine pass ever reaches memory. Launches for the branches of one call run in stream order.
// Backward: each key tile accumulates its dk and dv over the branch's query tiles in registers; dq goes to a float32
// accumulator through atomics. All three accumulators are float32 and receive one term per branch.
//
// q, out, dout: (B, N, H, D); k, v: (B, N, Hkv, D); strides in elements for (batch, token, head), head dim stride 1.
// lse, lse_log2, delta: (B, H, N) float32 contiguous. Accumulators: (B, N, heads of the chunk, D) float32 contiguous,
// head h at index h - acc_head0 (dq) and h / group - acc_kv_head0 (dk, dv).
struct FusedDilatedParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_strides[3] = {0, 0, 0};
  int64_t k_strides[3] = {0, 0, 0};
  int64_t v_strides[3] = {0, 0, 0};
  const bool* key_padding = nullptr;  // (B, N) contiguous, true = key removed; null = no mask

  // forward
  void* out = nullptr;
  int64_t out_strides[3] = {0, 0, 0};
  float* lse = nullptr;
  bool first = false;  // no branch has written these heads yet: out is zero and lse -inf, nothing to read
  bool portable = false;  // the mma.sync kernels even where the Hopper (wgmma) ones run: tests and benchmarks

  // backward
  const void* dout = nullptr;
  int64_t dout_strides[3] = {0, 0, 0};
  const float* lse_log2 = nullptr;  // merged lse · log2(e); +inf where a query has no key
  const float* delta = nullptr;     // rowsum(dout · out)
  float* dq_acc = nullptr;
  float* dk_acc = nullptr;
  float* dv_acc = nullptr;
  int64_t acc_heads = 0;     // heads of dq_acc
  int64_t acc_kv_heads = 0;  // heads of dk_acc and dv_acc
  int64_t acc_head0 = 0;
  int64_t acc_kv_head0 = 0;
  // dk_acc and dv_acc are written, not added to: the launch writes every row of the chunk exactly once (r = 1, all
  // of its heads, one query head per kv head), so the accumulators need no zeroing before it.
  bool kv_store = false;

  int64_t batch = 0, n = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int64_t w = 0, r = 1;                // the branch; w already clamped to n
  int64_t head_lo = 0, head_hi = 0;    // query heads this launch attends for
  bool causal = false;
  float scale = 1.f;

  ElementType dtype = ElementType::bfloat16;
  cudaStream_t stream = nullptr;
};

}  // namespace longnet::attention::kernels
