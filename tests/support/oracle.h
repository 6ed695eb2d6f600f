// Float64 dense oracle of dilated attention: the definition in attention/dilated_attention.h, written as one dense
// softmax over the key multiset, independently of the backends.
//
//   C[b, h, p, k] = number of branches (w_i, r_i) that put query p and key k in one segment of w_i = min(w_i, N)
//                   positions with both row indices ≡ h (mod r_i), times [k ≤ p if causal] · [key k not padding];
//                   with mix = head_split only branch i counts for the heads h of its group,
//                   floor(i·H/K) ≤ h < floor((i+1)·H/K), so each entry is 0 or 1
//   s[b, h, p, k] = scale · q[b, p, h] · k[b, k, h / (H / Hkv)] + bias[h, bucket(k - p)]
//   out[b, p, h]  = Σ_k C·e^s·v[b, k, h / (H / Hkv)] / Σ_k C·e^s,   lse[b, h, p] = log Σ_k C·e^s
// Rows with no key (C = 0 everywhere) give out = 0, lse = -inf, and zero gradient. Dense O(B·H·N²) on the CPU: for
// small test shapes only.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "attention/dilated_attention.h"

namespace longnet::test {

// C before causal and padding: (H, N, N) float64, entry [h, p, k] (config.mix taken into account).
at::Tensor branch_multiplicity(int64_t n, int64_t heads, const attention::DilatedAttentionConfig& config);

// q: (B, N, H, D); k, v: (B, N, Hkv, D); any floating dtype on the CPU, computed in float64 and differentiable
// w.r.t. q, k, v and options.relative_bias->table. Returns out (B, N, H, D) and lse (B, H, N), both float64.
attention::AttentionResult oracle_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const attention::DilatedAttentionConfig& config,
                                                    const attention::AttentionOptions& options = {});

// max |actual - expected| / max |expected| over the finite entries of `expected` (0 when both are all zero).
// Infinite entries must coincide exactly and no NaN may appear; otherwise +inf.
double relative_error(const at::Tensor& actual, const at::Tensor& expected);

}  // namespace longnet::test
