// The `flash` backend of dilated attention: torch's fused attention (cuDNN, else flash) on zero-copy strided views of
// q/k/v per branch and head offset (or block of heads on consecutive offsets), branch outputs merged in place by our combine_by_lse kernel, and an exact backward
// that calls each branch's fused backward with the merged output and merged LSE (no dense recomputation).
//
// Semantics: exactly those of attention/dilated_attention.h. Called by dilated_attention() when the backend resolves
// to `flash`; both functions are thread-safe (no global state besides torch's).
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "attention/dilated_attention.h"

namespace longnet::attention {

// q: (B, N, H, D); k, v: (B, N, Hkv, D), H % Hkv == 0; bf16 or fp16, one CUDA device.
// Returns out (B, N, H, D) in q's dtype and lse (B, H, N) float32, -inf where a query has no key.
// Differentiable w.r.t. q, k and v through `out` (exact: each fused call's backward runs with the merged output and
// LSE); `lse` is returned as a statistic without gradient. Throws longnet::Error naming the argument when
// flash_backend_supports is false. LONGNET_FLASH_ENGINE=cudnn|flash forces the fused engine (default: cuDNN for
// D <= 128, flash above; one-row calls always run on flash, whose backward cuDNN lacks).
AttentionResult flash_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const DilatedAttentionConfig& config, const AttentionOptions& options);

// The gradients w.r.t. q, k, v that the branches of `config` contribute when they are part of a larger mix (other
// branches, other ranks' keys) whose merged output is `out` (B, N, H, D) and merged LSE `lse` (B, H, N) float32, for
// an upstream gradient `dout` of the merged output. Exact for that mix: each fused backward sees the softmax over the
// whole key multiset through the merged LSE. The gradient through the merged LSE itself is not included. Same inputs
// and errors as flash_dilated_attention; dq, dk, dv come back in q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_dilated_attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& dout, const DilatedAttentionConfig& config, const AttentionOptions& options);

// Whether flash_dilated_attention can run these inputs: a build with LONGNET_WITH_CUDA, q on a CUDA device,
// bf16/fp16, D ≤ 256 and a multiple of 8, no relative position bias. When false and `why` is given, *why says what is
// missing and how to get it.
bool flash_backend_supports(const at::Tensor& q, const AttentionOptions& options, std::string* why);

}  // namespace longnet::attention
