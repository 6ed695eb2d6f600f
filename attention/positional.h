// Position encodings applied to q and k by the attention module: rotary (RoPE, Su et al. 2021, arXiv:2104.09864) and
// its length-extrapolating variant xPos (Sun et al. 2022, arXiv:2212.10554). Pure functions of positions. The T5
// relative position bias is no q/k transform: its table lives in MultiheadDilatedAttention and its buckets
// (relative_position_bucket in attention/reference.h) are applied to the scores inside the attention.
//
//   auto [cos, sin] = rotary_cos_sin(positions, D, 10000.0);      // (N, D/2) each
//   auto q_rot = apply_rotary(q, cos, sin);                          // q: (B, N, H, D)
//   auto q_xpos = apply_rotary(q, cos, sin, xpos_scale(centred, D, 512.0));
//   auto k_xpos = apply_rotary(k, cos, sin, xpos_scale(centred, D, 512.0).reciprocal());
//
// Rotation pairs dimension i with i + D/2 ("rotate half", as GPT-NeoX and LLaMA): a fixed permutation of the paper's
// interleaved pairs, so it is the same encoding up to how the projection weights are laid out.
#pragma once

#include <cstdint>
#include <utility>

#include <ATen/core/Tensor.h>

namespace longnet::attention {

// positions: (N,) any numeric dtype → (cos, sin) of angle positions[n] · θ^(-2i/D), each (N, D/2), float64 (a float32
// angle at position 1e5 is off by ~0.01 rad; the tables are N·D/2 values, so float64 costs nothing).
std::pair<at::Tensor, at::Tensor> rotary_cos_sin(const at::Tensor& positions, int64_t head_dim, double theta);

// xPos per-position scale ζ_i^(positions[n] / scale_base) with ζ_i = (2i/D + 0.4) / 1.4: (N, D/2) float64.
at::Tensor xpos_scale(const at::Tensor& positions, int64_t head_dim, double scale_base);

// x: (B, N, H, D); cos, sin, scale: (N, D/2) → x rotated on the pairs (i, i + D/2), then multiplied by scale (when
// given), in x's dtype. The arithmetic runs in float32 for half inputs (float64 for float64).
at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& scale = {});

// The tables split_qkv rotates q and k by (cos, sin and the xPos scales, each (N, D/2)); cos undefined: none.
// dilated_attention_packed (dilated_attention.h) takes them as one.
struct QkvRotation {
  at::Tensor cos, sin, q_scale, k_scale;
};

// The projections of a layer as one packed tensor qkv (B, N, (H + 2·Hkv)·D), split into q (B, N, H, D), k and v
// (B, N, Hkv, D), with q and k rotated as apply_rotary(q, cos, sin, q_scale) and apply_rotary(k, cos, sin, k_scale)
// when cos is defined. On CUDA (float32/half) one autograd function returns all three contiguous, and its backward
// writes their gradients straight into one packed gradient; elsewhere they are split_with_sizes views (v stays one).
struct Qkv {
  at::Tensor q, k, v;
};
Qkv split_qkv(const at::Tensor& qkv, int64_t heads, int64_t kv_heads, const at::Tensor& cos = {},
              const at::Tensor& sin = {}, const at::Tensor& q_scale = {}, const at::Tensor& k_scale = {});

}  // namespace longnet::attention
