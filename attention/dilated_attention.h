// Exact dilated attention (LongNet, arXiv:2307.02486 §2.2), the one entry point every model uses.
//
// Semantics (every backend computes exactly this; tests/support/oracle.h defines it in float64):
//   Branches (w_i, r_i), i = 1..K. The sequence splits into segments of length w_i (the last one may be shorter;
//   w_i > N is clamped to N). Within a segment, branch i keeps the rows whose index inside the segment is
//   ≡ o (mod r_i), for queries and keys alike, with o = h mod r_i for query head h (the paper's per-head offsets).
//   Query p of head h attends, with softmax, over the multiset union of the keys each branch gives it (a key seen
//   through two branches counts twice). Equivalently, branch outputs are mixed by their softmax denominators
//   (combine_by_lse). Causal removes keys after p; the key padding mask removes keys. A query that no branch
//   selects, or whose keys are all removed, outputs zeros and has LSE = -inf.
//
// Mix modes (DilatedAttentionConfig::mix):
//   lse         the above: every head attends through every branch, branches mixed by their softmax denominators.
//   head_split  the H query heads are split among the K branches in contiguous groups (group i holds heads
//               [floor(i·H/K), floor((i+1)·H/K)), so H >= K is required), and head h of group i attends through
//               branch i only: a softmax over the keys branch i gives it, with the same offset o = h mod r_i, causal
//               mask, key padding and grouped-query kv heads as above. Queries branch i does not select output zeros
//               with LSE = -inf. With K = 1 both modes are the same.
//
// Usage:
//   DilatedAttentionConfig cfg{.segment_lengths = {2048, 4096}, .dilation_rates = {1, 2}, .causal = true};
//   cfg.validate();
//   auto [out, lse] = dilated_attention(q, k, v, cfg);
//
// Backends: `reference` (torch ops; any device and dtype; the CPU path; differentiable through autograd),
// `flash` (CUDA, bf16/fp16: torch's fused attention on zero-copy strided views, branches combined by our kernel,
// exact backward through a custom autograd function; both mix modes) and `fused` (CUDA sm_80+, bf16/fp16, D = 64 or
// 128: our own tensor-core kernels, one pass per branch with the merge in the epilogue; attention/fused_backend.h).
// `automatic` picks, for CUDA bf16/fp16 inputs without a relative position bias, `fused` where its forward is the
// Hopper kernel (compute capability 9.x, D = 64; there it is the fastest, and its backward is the flash backend's)
// and `flash` elsewhere; `reference` otherwise. An explicitly requested backend that cannot run the inputs raises an
// error naming what is missing. Thread-safe (no global state besides torch's).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "attention/positional.h"

namespace longnet::attention {

enum class Backend { automatic, reference, flash, fused };

// "auto" | "reference" | "flash" | "fused"
Backend parse_backend(const std::string& name);
std::string to_string(Backend backend);

// How the K branches are combined (see the semantics above).
enum class Mix { lse, head_split };

// "lse" | "head_split"
Mix parse_mix(const std::string& name);
std::string to_string(Mix mix);

struct DilatedAttentionConfig {
  std::vector<int64_t> segment_lengths{2048};  // w_i > 0
  std::vector<int64_t> dilation_rates{1};      // r_i > 0, w_i % r_i == 0
  bool causal = false;
  Backend backend = Backend::automatic;
  Mix mix = Mix::lse;

  // Throws ConfigError for empty or mismatched lists, w_i < 1, r_i < 1 or w_i not divisible by r_i. (H >= K for
  // head_split depends on the inputs: dilated_attention() checks it.)
  void validate() const;
  // For `heads` query heads: one line per head that leaves some row index of a segment uncovered by every branch
  // that head attends through (all branches with lse; its own group's branch with head_split), as such queries
  // output zeros. Empty when every position of every head is covered. Throws ConfigError for head_split with
  // heads < K.
  std::vector<std::string> coverage_warnings(int64_t heads) const;
  // The query heads [lo, hi) that branch `branch` attends for: all of them with lse; its group with head_split.
  std::pair<int64_t, int64_t> branch_heads(size_t branch, int64_t heads) const;
  // Effective forward FLOPs of the branches at length n (Σ_i (n/w_i)·H_i·4·(w_i/r_i)²·D, ragged tail included;
  // H_i = H with lse, the size of branch i's group of heads with head_split).
  double forward_flops(int64_t batch, int64_t n, int64_t heads, int64_t head_dim) const;
};

// T5-style relative position bias (Raffel et al. 2020, §2.1): a learned scalar per head and bucket of the signed
// distance (key - query) in original sequence positions, added to the scores. Supported by the reference backend.
struct RelativePositionBias {
  at::Tensor table;           // (H, num_buckets), any float dtype, same device as q
  int64_t num_buckets = 32;
  int64_t max_distance = 128;
  bool bidirectional = true;  // false for causal models: only non-positive distances get their own buckets
};

struct AttentionOptions {
  std::optional<at::Tensor> key_padding_mask;  // (B, N) bool, true = padding (the key is removed), as in torch MHA
  std::optional<double> scale;                 // default 1/sqrt(D)
  std::optional<RelativePositionBias> relative_bias;
};

struct AttentionResult {
  at::Tensor out;  // (B, N, H, D), dtype and device of q
  at::Tensor lse;  // (B, H, N) float32 (float64 for float64 inputs); -inf where a query has no key. Differentiable
                   // with the reference backend; with flash only `out` carries gradients (the LSE is a by-product)
};

// q: (B, N, H, D); k, v: (B, N, Hkv, D) with H % Hkv == 0 (grouped-query heads: query head h reads kv head
// h / (H / Hkv)). Same dtype and device; D ≤ 256 for `flash`.
AttentionResult dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const DilatedAttentionConfig& config, const AttentionOptions& options = {});

// Attention on a layer's packed projection qkv (B, N, (H + 2·Hkv)·D): on the q, k and v that
// split_qkv(qkv, heads, kv_heads, rotation's tables) gives, by the backend dilated_attention would choose for them.
// The fused backend reads the slots where they lie (rotating only q and k) and its backward writes the packed
// gradient from its float32 accumulators in one pass; every other backend runs split_qkv, then dilated_attention.
AttentionResult dilated_attention_packed(const at::Tensor& qkv, int64_t heads, int64_t kv_heads,
                                         const QkvRotation& rotation, const DilatedAttentionConfig& config,
                                         const AttentionOptions& options = {});

// The backend `automatic` resolves to for these inputs (what would run).
Backend resolve_backend(const at::Tensor& q, const DilatedAttentionConfig& config, const AttentionOptions& options);

}  // namespace longnet::attention
