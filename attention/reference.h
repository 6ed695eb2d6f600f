// The `reference` backend of dilated attention: composed torch ops, any device and dtype, differentiable through
// autograd (the gradient includes the path through the LSE weights of the branch mix).
//
// Steps (LongNet §2.2, named as in torchscale's dilated_attention.py): for every branch (w, r) and head offset o,
// `sparsify` takes the rows ≡ o (mod r) of every segment as strided views, `attend` runs masked softmax attention
// inside each sparse segment and returns (out, lse), `scatter` puts the rows back at their original positions, and
// `combine_by_lse` mixes the branches by their log-sum-exp. With mix = head_split there is no mix: each branch runs on
// its group's heads only (global head indices give the offsets) and the groups are concatenated.
//
// Semantics: exactly those of attention/dilated_attention.h. Inputs are assumed valid (dilated_attention() checks
// them). Thread-safe (no global state besides torch's).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "attention/dilated_attention.h"

namespace longnet::attention {

// q: (B, N, H, D); k, v: (B, N, Hkv, D), H % Hkv == 0; one dtype and device.
// Returns out (B, N, H, D) in q's dtype and lse (B, H, N) float32 (float64 for float64 inputs), -inf where a query
// has no key. Scores are computed in q's dtype; softmax, LSE and the branch mix in float32 (float64 for float64).
AttentionResult reference_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const DilatedAttentionConfig& config, const AttentionOptions& options);

// Softmax attention of q (..., M, D) over k, v (..., K, D) with keys removed where `keep` (broadcastable to
// (..., M, K) bool; undefined: none) is false and an additive `bias` (undefined: none), scores in dtype `acc`.
// Returns out (..., M, D) and lse (..., M) in `acc`; a query without keys gets out = 0 and lse = -inf with finite
// gradients. The building block of the reference backend, shared by the sequence-parallel spanning branches.
AttentionResult masked_softmax_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& keep, const at::Tensor& bias, double scale,
                                         at::ScalarType acc);

// Merges two partial attention results over disjoint key multisets into the result over their union:
// lse = log(e^lse_a + e^lse_b), out = (e^lse_a · out_a + e^lse_b · out_b) / e^lse. A side with lse = -inf contributes
// nothing; both -inf gives out = 0, lse = -inf with finite gradients.
// out_*: (B, N, H, D); lse_*: (B, H, N); one floating dtype.
AttentionResult combine_by_lse(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                               const at::Tensor& lse_b);

// T5 bucket (Raffel et al. 2020; HF `_relative_position_bucket`) of the signed distance key_pos - query_pos.
// Bidirectional: half the buckets for keys after the query. Of each half, the first half holds exact distances and
// the rest log-spaced distances up to max_distance, computed in double as
// max_exact + floor(log(n / max_exact) / log(max_distance / max_exact) · (buckets - max_exact)), clamped.
// Not bidirectional: keys after the query share bucket 0 with distance 0.
int64_t relative_position_bucket(int64_t distance, int64_t num_buckets, int64_t max_distance, bool bidirectional);

}  // namespace longnet::attention
