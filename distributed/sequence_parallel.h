// Sequence-parallel dilated attention (LongNet, arXiv:2307.02486 §3.2): one sequence of N tokens split across the P
// ranks of a group, exactly equal to attention::dilated_attention on the whole sequence, forward and gradients.
//
// Split rule (sequence_part): contiguous parts, rank p holds [start_p, start_p + n_p) with n_p = floor(N/P) plus one
// for the first N mod P ranks.
//
// Algorithm, per branch (w, r) with w clamped to N:
//   * local branch: every rank's part starts on a segment boundary and ends on one (or at N). All its segments lie
//     inside one rank: the rank runs it on its own rows with attention::dilated_attention, no communication.
//   * spanning branch: some segment crosses a part boundary. Head h of the branch only ever reads rows whose
//     position is ≡ h (mod r) (segments start at multiples of w and r divides w), so every rank sparsifies its keys
//     and values per head offset into a (B, ceil(max_p n_p / r), H, 2D+1) buffer (the last channel carries the key
//     padding) and all-gathers only that: N/r rows per rank, which stays bounded as N grows when r grows with w.
//     Queries stay local; each query attends, with softmax, over the gathered rows of its own segment (causal and
//     key padding applied by original position). The backward reduce-scatters the gradients of the gathered rows
//     back to their owners.
//   * branch outputs and LSEs are mixed by combine_by_lse as in the single-device function; a spanning branch's
//     queries are the 1/r of the rows it selects, so it is computed on those rows only and merged into them in
//     place (its cost follows N/r, not N). All heads go through one attention call (masked softmax over the
//     gathered rows, torch ops), split into calls over chunks of query rows so that the scores of one call stay within
//     LONGNET_SP_SCORE_ELEMENTS elements (default 2^27).
// Communication per rank and spanning branch: the forward all-gathers, the backward reduce-scatters the gradient of
// what was gathered (the backward reuses the forward's gathered rows); each moves, per direction,
//   (P - 1) · B · ceil(max_p n_p / r) · H · (2D + 1) elements.
// Local branches move nothing.
//
// Gradients: with no spanning branch the result is attention::dilated_attention itself (any backend). Otherwise a
// custom autograd function runs the forward without autograd and differentiates each part of the mix with the merged
// output and LSE; the local branches run through attention::dilated_attention with the config's backend (flash on
// CUDA bf16/fp16, reference otherwise) and only the gradient of their output is used, so the backend's LSE need not
// carry gradients; spanning branches use torch ops (any device) on their selected rows, and their gradients are added
// into those rows of dq, dk and dv. Both outputs are differentiable.
// mix = lse only; no relative position bias.
//
// Usage (every rank of `group`, same config, its own rows):
//   auto part = sequence_part(N, group.size(), group.rank());
//   auto [out, lse] = sequence_parallel_dilated_attention(q.narrow(1, part.start, part.length), ..., cfg, {},
//                                                         group, N);
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "attention/dilated_attention.h"
#include "attention/multihead_dilated_attention.h"
#include "distributed/process_group.h"

namespace longnet::distributed {

struct SequencePart {
  int64_t start = 0;
  int64_t length = 0;
};

// Rank `index` of `parts`: n = floor(N/P) + (index < N mod P), starting after the parts before it.
SequencePart sequence_part(int64_t n, int64_t parts, int64_t index);

// Whether branch (segment_length, dilation_rate) needs rows of other ranks for some query (see above).
bool branch_spans_ranks(int64_t n, int64_t parts, int64_t segment_length);

// q: (B, n_p, H, D), k, v: (B, n_p, Hkv, D): this rank's rows [start_p, start_p + n_p) of a sequence of global_n
// tokens split by sequence_part; options.key_padding_mask: (B, n_p). Returns this rank's out (B, n_p, H, D) and
// lse (B, H, n_p), equal to those rows of dilated_attention on the whole sequence. Differentiable w.r.t. q, k and v.
// Collective: every rank of `group` calls it with the same config, global_n, B, H and D (the backward too). Bytes
// moved by this rank (forward, and backward when it runs) are added to *stats; `group` and `stats` must outlive the
// backward.
attention::AttentionResult sequence_parallel_dilated_attention(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v,
                                                               const attention::DilatedAttentionConfig& config,
                                                               const attention::AttentionOptions& options,
                                                               const ProcessGroup& group, int64_t global_n,
                                                               CommStats* stats = nullptr);

// This rank's part of a sequence of global_n tokens for the attention layers of a model
// (attention::MultiheadDilatedAttention, fusion::LongNetLM): its position in the sequence, and attention through
// sequence_parallel_dilated_attention over `group`. `group` and `stats` must outlive every backward through it.
attention::SequenceShard sequence_shard(const ProcessGroup& group, int64_t global_n, CommStats* stats = nullptr);

}  // namespace longnet::distributed
