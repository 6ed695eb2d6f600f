#include "tests/support/oracle.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <torch/torch.h>

namespace longnet::test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// T5 bucket of a key `key_minus_query` positions after its query, spelled as in HF transformers'
// `_relative_position_bucket`, with the log taken in double (the definition in attention/dilated_attention.h).
int64_t t5_bucket(int64_t key_minus_query, int64_t num_buckets, int64_t max_distance, bool bidirectional) {
  int64_t base = 0;
  int64_t half = num_buckets;
  int64_t back = -key_minus_query;  // how far before the query the key lies
  if (bidirectional) {
    half = num_buckets / 2;
    if (back < 0) {
      base = half;
      back = -back;
    }
  } else if (back < 0) {
    back = 0;
  }
  const int64_t exact = half / 2;
  if (back < exact) return base + back;
  const double fraction = std::log(static_cast<double>(back) / static_cast<double>(exact)) /
                          std::log(static_cast<double>(max_distance) / static_cast<double>(exact));
  return base + std::min(half - 1, exact + static_cast<int64_t>(fraction * static_cast<double>(half - exact)));
}

}  // namespace

at::Tensor branch_multiplicity(int64_t n, int64_t heads, const attention::DilatedAttentionConfig& config) {
  std::vector<double> count(static_cast<size_t>(heads * n * n), 0.0);
  for (size_t i = 0; i < config.segment_lengths.size(); ++i) {
    const int64_t w = std::min(config.segment_lengths[i], n);
    const int64_t r = config.dilation_rates[i];
    // head_split: branch i belongs to heads [floor(i·H/K), floor((i+1)·H/K)) only.
    const auto branches = static_cast<int64_t>(config.segment_lengths.size()), index = static_cast<int64_t>(i);
    const bool split = config.mix == attention::Mix::head_split;
    const int64_t first_head = split ? index * heads / branches : 0;
    const int64_t end_head = split ? (index + 1) * heads / branches : heads;
    for (int64_t h = first_head; h < end_head; ++h) {
      for (int64_t p = 0; p < n; ++p) {
        if ((p % w) % r != h % r) continue;
        for (int64_t key = 0; key < n; ++key) {
          if (key / w == p / w && (key % w) % r == h % r) count[static_cast<size_t>((h * n + p) * n + key)] += 1.0;
        }
      }
    }
  }
  return torch::tensor(count, torch::kDouble).view({heads, n, n});
}

attention::AttentionResult oracle_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const attention::DilatedAttentionConfig& config,
                                                    const attention::AttentionOptions& options) {
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t group = H / k.size(2);
  // kv head of every query head: (H,)
  const auto kv_head = torch::arange(H, torch::kLong).div(group, "floor");
  const auto q64 = q.to(torch::kDouble);                                    // (B, N, H, D)
  const auto k64 = k.to(torch::kDouble).index_select(2, kv_head);          // (B, N, H, D)
  const auto v64 = v.to(torch::kDouble).index_select(2, kv_head);          // (B, N, H, D)

  auto count = branch_multiplicity(N, H, config).unsqueeze(0);  // (1, H, N, N)
  if (config.causal) count = count * torch::ones({N, N}, torch::kDouble).tril();
  if (options.key_padding_mask) {
    const auto key_kept = options.key_padding_mask->logical_not().to(torch::kDouble).view({B, 1, 1, N});
    count = count * key_kept;
  }
  count = count.expand({B, H, N, N});

  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  auto scores = torch::einsum("bphd,bkhd->bhpk", {q64, k64}) * scale;  // (B, H, N, N)
  if (options.relative_bias) {
    const auto& bias = *options.relative_bias;
    std::vector<int64_t> bucket(static_cast<size_t>(N * N));
    for (int64_t p = 0; p < N; ++p) {
      for (int64_t key = 0; key < N; ++key) {
        bucket[static_cast<size_t>(p * N + key)] =
            t5_bucket(key - p, bias.num_buckets, bias.max_distance, bias.bidirectional);
      }
    }
    const auto index = torch::tensor(bucket, torch::kLong);
    scores = scores + bias.table.to(torch::kDouble).index_select(1, index).view({1, H, N, N});
  }

  // Σ_k C·e^s with e^s scaled by the largest visible score of the row; rows without visible keys use 0 instead.
  const auto visible = count > 0;
  auto row_max = scores.masked_fill(visible.logical_not(), -kInf).amax({-1}, /*keepdim=*/true).detach();
  row_max = torch::where(torch::isfinite(row_max), row_max, torch::zeros_like(row_max));
  const auto weight = count * torch::exp(scores.masked_fill(visible.logical_not(), -kInf) - row_max);
  const auto total = weight.sum(-1);  // (B, H, N)
  const auto has_key = total > 0;
  const auto total_or_one = torch::where(has_key, total, torch::ones_like(total));
  const auto out = torch::einsum("bhpk,bkhd->bphd", {weight, v64}) / total_or_one.permute({0, 2, 1}).unsqueeze(-1);
  const auto lse = torch::where(has_key, torch::log(total_or_one) + row_max.squeeze(-1),
                                torch::full_like(total, -kInf));
  return {out, lse};
}

double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const auto a = actual.detach().to(torch::kDouble).cpu();
  const auto e = expected.detach().to(torch::kDouble).cpu();
  if (a.sizes() != e.sizes()) return kInf;
  if (torch::isnan(a).any().item<bool>() || torch::isnan(e).any().item<bool>()) return kInf;
  const auto e_inf = torch::isinf(e);
  if (!torch::equal(torch::isinf(a), e_inf) || !torch::equal(a.masked_select(e_inf), e.masked_select(e_inf))) {
    return kInf;
  }
  const double diff = (a - e).masked_fill(e_inf, 0.0).abs().max().item<double>();
  const double magnitude = e.masked_fill(e_inf, 0.0).abs().max().item<double>();
  if (diff == 0.0) return 0.0;
  return magnitude > 0.0 ? diff / magnitude : kInf;
}

}  // namespace longnet::test
