#include "attention/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include <torch/torch.h>

namespace longnet::attention {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// A run of equal-length segments of one branch: its full segments, or its shorter last segment.
struct SegmentRun {
  int64_t start = 0;   // first position
  int64_t count = 0;   // segments in the run
  int64_t length = 0;  // positions per segment
};

std::vector<SegmentRun> segment_runs(int64_t n, int64_t segment_length) {
  const int64_t w = std::min(segment_length, n);
  std::vector<SegmentRun> runs;
  if (n / w > 0) runs.push_back({0, n / w, w});
  if (n % w > 0) runs.push_back({(n / w) * w, 1, n % w});
  return runs;
}

// Softmax, LSE and the branch mix run in float32 for half/bfloat16/float32 inputs (the precision of the float32 LSE
// every backend returns) and in float64 for float64 inputs, so that the reference can serve as an oracle there.
at::ScalarType accumulate_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// Grouped-query heads: query head h reads kv head h / (H / Hkv). Expanding k and v to H heads lets every later step
// slice query and kv heads alike; autograd sums the gradient over each group.
// x: (B, N, Hkv, D) -> (B, N, H, D)
at::Tensor expand_kv_heads(const at::Tensor& x, int64_t heads) {
  const int64_t kv_heads = x.size(2);
  if (kv_heads == heads) return x;
  return x.unsqueeze(3)
      .expand({x.size(0), x.size(1), kv_heads, heads / kv_heads, x.size(3)})
      .reshape({x.size(0), x.size(1), heads, x.size(3)});
}

// Rows o, o+r, ... of every segment of `run`, for heads first, first+r, ... (the local heads whose offset is o).
// Strided views only.
// x: (B, N, H, D), N-axis splittable by view -> (B, S, H_o, M, D) with S = run.count, H_o = |{h : h mod r = first}|,
// M = ceil((len-o)/r)
at::Tensor sparsify(const at::Tensor& x, const SegmentRun& run, int64_t r, int64_t o, int64_t first) {
  const int64_t B = x.size(0), H = x.size(2), D = x.size(3);
  return x.narrow(1, run.start, run.count * run.length)
      .view({B, run.count, run.length, H, D})
      .slice(2, o, run.length, r)
      .slice(3, first, H, r)
      .permute({0, 1, 3, 2, 4});
}

// keep_key: (B, N) bool -> (B, S, 1, 1, M), the key axis of the scores.
at::Tensor sparsify_keys(const at::Tensor& keep_key, const SegmentRun& run, int64_t r, int64_t o) {
  const int64_t B = keep_key.size(0);
  return keep_key.narrow(1, run.start, run.count * run.length)
      .view({B, run.count, run.length})
      .slice(2, o, run.length, r)
      .unsqueeze(2)
      .unsqueeze(3);
}

// Relative position bias of one sparse segment: sparse rows j, j' sit (j' - j)·r positions apart in the original
// sequence, the same for every segment. table: (H, buckets) -> (H_o, M, M) in dtype `acc`, for local heads first,
// first+r, ...
at::Tensor sparse_bias(const RelativePositionBias& bias, int64_t rows, int64_t r, int64_t first, at::ScalarType acc) {
  std::vector<int64_t> bucket_of_step(static_cast<size_t>(2 * rows - 1));
  for (int64_t step = -(rows - 1); step < rows; ++step) {
    bucket_of_step[static_cast<size_t>(step + rows - 1)] =
        relative_position_bucket(step * r, bias.num_buckets, bias.max_distance, bias.bidirectional);
  }
  std::vector<int64_t> buckets(static_cast<size_t>(rows * rows));
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t jk = 0; jk < rows; ++jk) {
      buckets[static_cast<size_t>(j * rows + jk)] = bucket_of_step[static_cast<size_t>(jk - j + rows - 1)];
    }
  }
  const auto index = torch::tensor(buckets, torch::dtype(torch::kLong)).to(bias.table.device());
  const auto table = bias.table.slice(0, first, bias.table.size(0), r).to(acc);  // (H_o, buckets)
  return table.index_select(1, index).view({table.size(0), rows, rows});
}

// Masked softmax attention inside every sparse segment (masked_softmax_attention in reference.h).
// q_s, k_s, v_s: (B, S, H_o, M, D) in the input dtype; keep: broadcastable to (B, S, H_o, M, M) bool or undefined;
// bias: (H_o, M, M) or undefined. Returns out (B, S, H_o, M, D) and lse (B, S, H_o, M), both in dtype `acc`.
AttentionResult attend(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& v_s, const at::Tensor& keep,
                       const at::Tensor& bias, double scale, at::ScalarType acc) {
  auto scores = at::matmul(q_s, k_s.transpose(-1, -2)).to(acc) * scale;  // (B, S, H_o, M, M)
  if (bias.defined()) scores = scores + bias;
  if (keep.defined()) scores = scores.masked_fill(keep.logical_not(), kNegInf);
  // Shifting by the row max keeps exp() in range; the shift cancels exactly, so it carries no gradient. A row whose
  // keys are all removed has max -inf: shift by 0 instead, so exp(-inf) = 0 rather than exp(-inf + inf) = NaN.
  auto shift = at::amax(scores, {-1}, /*keepdim=*/true).detach();
  shift = shift.masked_fill(shift == kNegInf, 0.0);
  const auto weights = at::exp(scores - shift);
  const auto denom = weights.sum(-1, /*keepdim=*/true);
  // Rows without keys: denominator 1 so that out = 0 and no 1/0 reaches the gradient; lse = -inf set by `where`,
  // whose backward sends zero (not inf·0) to the unused side.
  const auto has_key = denom > 0;
  const auto denom_safe = at::where(has_key, denom, 1.0);
  const auto probs = weights / denom_safe;
  const auto out = at::matmul(probs.to(v_s.scalar_type()), v_s).to(acc);
  const auto lse = at::where(has_key, at::log(denom_safe) + shift, kNegInf).squeeze(-1);
  return {out, lse};
}

// Writes one offset's rows back to their original positions (in place, recorded by autograd).
// part.out: (B, S, H_o, M, D) -> out_full (B, N, H, D); part.lse: (B, S, H_o, M) -> lse_full (B, H, N).
void scatter(const AttentionResult& part, const SegmentRun& run, int64_t r, int64_t o, int64_t first,
             at::Tensor& out_full, at::Tensor& lse_full) {
  sparsify(out_full, run, r, o, first).copy_(part.out);
  const int64_t B = lse_full.size(0), H = lse_full.size(1);
  lse_full.narrow(2, run.start, run.count * run.length)
      .view({B, H, run.count, run.length})
      .slice(3, o, run.length, r)
      .slice(1, first, H, r)
      .permute({0, 2, 1, 3})
      .copy_(part.lse);
}

// One branch (w, r) over the whole sequence: positions it does not select keep out = 0, lse = -inf.
// q, k, v: (B, N, H, D) contiguous, or a head range [head0, head0 + H) of contiguous tensors (the offset of local
// head j is (head0 + j) mod r); keep_key: (B, N) bool or undefined; bias->table: (H, buckets) for these heads.
AttentionResult attend_branch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& keep_key,
                              int64_t segment_length, int64_t r, int64_t head0, bool causal, double scale,
                              const std::optional<RelativePositionBias>& bias, at::ScalarType acc) {
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  auto out_full = at::zeros({B, N, H, D}, q.options().dtype(acc));
  auto lse_full = at::full({B, H, N}, kNegInf, q.options().dtype(acc));
  for (const SegmentRun& run : segment_runs(N, segment_length)) {
    // Offsets o >= run.length have no rows (a short last segment); an offset whose first local head is >= H has no
    // heads (r > H).
    for (int64_t o = 0; o < std::min(r, run.length); ++o) {
      const int64_t first = ((o - head0) % r + r) % r;  // first local head with (head0 + j) mod r = o
      if (first >= H) continue;
      const int64_t rows = (run.length - o + r - 1) / r;
      at::Tensor keep;
      if (causal) keep = at::ones({rows, rows}, q.options().dtype(at::kBool)).tril();
      if (keep_key.defined()) {
        const auto keep_sparse = sparsify_keys(keep_key, run, r, o);
        keep = keep.defined() ? keep.logical_and(keep_sparse) : keep_sparse;
      }
      const at::Tensor bias_sparse = bias ? sparse_bias(*bias, rows, r, first, acc) : at::Tensor();
      const auto part = attend(sparsify(q, run, r, o, first), sparsify(k, run, r, o, first),
                               sparsify(v, run, r, o, first), keep, bias_sparse, scale, acc);
      scatter(part, run, r, o, first, out_full, lse_full);
    }
  }
  return {out_full, lse_full};
}

}  // namespace

int64_t relative_position_bucket(int64_t distance, int64_t num_buckets, int64_t max_distance, bool bidirectional) {
  int64_t bucket = 0;
  int64_t n = -distance;  // > 0: the key precedes the query
  if (bidirectional) {
    num_buckets /= 2;
    if (n < 0) bucket += num_buckets;
    n = std::abs(n);
  } else {
    n = std::max<int64_t>(n, 0);
  }
  const int64_t max_exact = num_buckets / 2;
  if (n < max_exact) return bucket + n;
  const double log_ratio = std::log(static_cast<double>(n) / static_cast<double>(max_exact)) /
                           std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact));
  const auto large = max_exact + static_cast<int64_t>(log_ratio * static_cast<double>(num_buckets - max_exact));
  return bucket + std::min(large, num_buckets - 1);
}

AttentionResult masked_softmax_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& keep, const at::Tensor& bias, double scale,
                                         at::ScalarType acc) {
  return attend(q, k, v, keep, bias, scale, acc);
}

AttentionResult combine_by_lse(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                               const at::Tensor& lse_b) {
  // Same -inf handling as attend(): the shift cancels (no gradient), and is 0 where neither side has keys.
  auto shift = at::maximum(lse_a, lse_b).detach();
  shift = shift.masked_fill(shift == kNegInf, 0.0);
  const auto weight_a = at::exp(lse_a - shift), weight_b = at::exp(lse_b - shift);  // (B, H, N)
  const auto total = weight_a + weight_b;
  const auto has_key = total > 0;
  const auto total_safe = at::where(has_key, total, 1.0);
  const auto lse = at::where(has_key, at::log(total_safe) + shift, kNegInf);
  // (B, H, N) -> (B, N, H, 1), to weight the rows of out
  const auto rows = [](const at::Tensor& x) { return x.permute({0, 2, 1}).unsqueeze(-1); };
  const auto out = (rows(weight_a) * out_a + rows(weight_b) * out_b) / rows(total_safe);
  return {out, lse};
}

AttentionResult reference_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const DilatedAttentionConfig& config, const AttentionOptions& options) {
  // q: (B, N, H, D); k, v: (B, N, Hkv, D) -> (B, N, H, D)
  const int64_t H = q.size(2), D = q.size(3);
  const auto acc = accumulate_type(q.scalar_type());
  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  const auto q_c = q.contiguous();
  const auto k_c = expand_kv_heads(k.contiguous(), H);
  const auto v_c = expand_kv_heads(v.contiguous(), H);
  at::Tensor keep_key;  // (B, N) bool, true where the key takes part
  if (options.key_padding_mask) keep_key = options.key_padding_mask->logical_not();

  if (config.mix == Mix::head_split) {
    // Group i = heads [floor(i·H/K), floor((i+1)·H/K)) runs branch i alone; the groups are concatenated along H.
    const auto branches = static_cast<int64_t>(config.segment_lengths.size());
    std::vector<at::Tensor> outs, lses;
    for (size_t i = 0; i < config.segment_lengths.size(); ++i) {
      const auto index = static_cast<int64_t>(i);
      const int64_t head0 = index * H / branches, heads = (index + 1) * H / branches - head0;
      std::optional<RelativePositionBias> bias = options.relative_bias;
      if (bias) bias->table = bias->table.narrow(0, head0, heads);
      const auto group = attend_branch(q_c.narrow(2, head0, heads), k_c.narrow(2, head0, heads),
                                       v_c.narrow(2, head0, heads), keep_key, config.segment_lengths[i],
                                       config.dilation_rates[i], head0, config.causal, scale, bias, acc);
      outs.push_back(group.out);  // (B, N, H_i, D)
      lses.push_back(group.lse);  // (B, H_i, N)
    }
    return {at::cat(outs, 2).to(q.scalar_type()), at::cat(lses, 1)};
  }

  std::optional<AttentionResult> total;
  for (size_t i = 0; i < config.segment_lengths.size(); ++i) {
    const auto branch = attend_branch(q_c, k_c, v_c, keep_key, config.segment_lengths[i], config.dilation_rates[i],
                                      /*head0=*/0, config.causal, scale, options.relative_bias, acc);
    total = total ? combine_by_lse(total->out, total->lse, branch.out, branch.lse) : branch;
  }
  return {total->out.to(q.scalar_type()), total->lse};
}

}  // namespace longnet::attention
