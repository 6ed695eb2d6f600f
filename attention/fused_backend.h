// The `fused` backend of dilated attention: our own tensor-core kernels (attention/kernels/fused_dilated*.cu), one
// launch per branch in each direction. The forward merges every query tile's rows into the running output and LSE in
// its epilogue, so there are no branch outputs, no gather copies and no combine pass; the backward recomputes each
// branch's probabilities from the merged LSE (exact for the whole mix) and accumulates dq, dk, dv in float32.
// On Hopper with D = 64 both directions load tiles with TMA and multiply on wgmma, and the backward adds dq by TMA
// reductions (LONGNET_FUSED_FORWARD=portable keeps both on mma.sync, for comparisons). LONGNET_FUSED_BACKWARD=flash
// takes the flash backend's exact backward instead (cuDNN per branch with the merged output and LSE).
//
// Semantics: exactly those of attention/dilated_attention.h (both mix modes, causal, key padding, grouped-query
// heads, ragged last segments, w > N). Thread-safe.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

#include "attention/dilated_attention.h"

namespace longnet::attention {

// q: (B, N, H, D); k, v: (B, N, Hkv, D); bf16 or fp16 on one CUDA device of compute capability 8.0 or later,
// D ∈ {64, 128}. Returns out (B, N, H, D) in q's dtype and lse (B, H, N) float32 (-inf where a query has no key);
// differentiable w.r.t. q, k, v through `out`. Throws longnet::Error naming what is missing when
// fused_backend_supports is false. Gradients use float32 atomics, so they are not bitwise reproducible.
AttentionResult fused_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const DilatedAttentionConfig& config, const AttentionOptions& options);

// fused_dilated_attention on the slots of a packed projection qkv (B, N, (H + 2·Hkv)·D), q and k rotated as
// split_qkv(qkv, heads, kv_heads, rotation's tables) would: see dilated_attention_packed. Differentiable w.r.t. qkv
// through `out`; the gradient comes back packed. Throws longnet::Error as fused_dilated_attention does, and for
// tables that are not (N, D/2).
AttentionResult fused_dilated_attention_packed(const at::Tensor& qkv, int64_t heads, int64_t kv_heads,
                                               const QkvRotation& rotation, const DilatedAttentionConfig& config,
                                               const AttentionOptions& options);

// Whether fused_dilated_attention can run these inputs; when false and `why` is given, *why says what is missing.
bool fused_backend_supports(const at::Tensor& q, const AttentionOptions& options, std::string* why);

// Whether `automatic` takes this backend for q: it runs q and its forward is the Hopper one (compute capability 9.x,
// D = 64, a build with sm_90a), which is faster than the flash backend's there.
bool fused_backend_preferred(const at::Tensor& q, const AttentionOptions& options);

}  // namespace longnet::attention
