#include "attention/dilated_attention.h"

#include <cmath>
#include <numeric>
#include <sstream>

#include <torch/torch.h>

#include "attention/flash_backend.h"
#include "attention/fused_backend.h"
#include "attention/reference.h"
#include "core/error.h"

namespace longnet::attention {

Backend parse_backend(const std::string& name) {
  if (name == "auto") return Backend::automatic;
  if (name == "reference") return Backend::reference;
  if (name == "flash") return Backend::flash;
  if (name == "fused") return Backend::fused;
  throw ConfigError("unknown attention backend '" + name + "' (expected auto, reference, flash or fused)");
}

std::string to_string(Backend backend) {
  switch (backend) {
    case Backend::automatic: return "auto";
    case Backend::reference: return "reference";
    case Backend::flash: return "flash";
    case Backend::fused: return "fused";
  }
  return "auto";
}

Mix parse_mix(const std::string& name) {
  if (name == "lse") return Mix::lse;
  if (name == "head_split") return Mix::head_split;
  throw ConfigError("unknown attention mix '" + name + "' (expected lse or head_split)");
}

std::string to_string(Mix mix) {
  switch (mix) {
    case Mix::lse: return "lse";
    case Mix::head_split: return "head_split";
  }
  return "lse";
}

namespace {

// head_split gives every branch at least one head: H >= K.
void check_head_split_heads(int64_t heads, int64_t branches) {
  if (heads < branches) {
    throw ConfigError("dilated_attention: mix = head_split needs at least one query head per branch, got H=" +
                      std::to_string(heads) + " heads for K=" + std::to_string(branches) + " branches");
  }
}

// The branch of head h with head_split: group i holds heads [floor(i·H/K), floor((i+1)·H/K)).
int64_t head_split_branch(int64_t head, int64_t heads, int64_t branches) {
  int64_t i = 0;
  while ((i + 1) * heads / branches <= head) ++i;
  return i;
}

}  // namespace

void DilatedAttentionConfig::validate() const {
  if (segment_lengths.empty()) throw ConfigError("dilated attention needs at least one branch (segment_lengths is empty)");
  if (segment_lengths.size() != dilation_rates.size()) {
    throw ConfigError("dilated attention needs one dilation rate per segment length (" +
                      std::to_string(segment_lengths.size()) + " segment lengths, " +
                      std::to_string(dilation_rates.size()) + " dilation rates)");
  }
  for (size_t i = 0; i < segment_lengths.size(); ++i) {
    const int64_t w = segment_lengths[i], r = dilation_rates[i];
    if (w < 1) throw ConfigError("segment_lengths[" + std::to_string(i) + "] must be >= 1, got " + std::to_string(w));
    if (r < 1) throw ConfigError("dilation_rates[" + std::to_string(i) + "] must be >= 1, got " + std::to_string(r));
    if (w % r != 0) {
      throw ConfigError("dilation_rates[" + std::to_string(i) + "] = " + std::to_string(r) +
                        " must divide segment_lengths[" + std::to_string(i) + "] = " + std::to_string(w));
    }
  }
}

std::vector<std::string> DilatedAttentionConfig::coverage_warnings(int64_t heads) const {
  // Row j of a segment is covered for head h by branch i when j ≡ h (mod r_i). Position p's row index differs per
  // branch (p mod w_i), but j mod r_i = p mod r_i because r_i divides w_i; so coverage depends on p mod lcm(r_i) only.
  // With head_split, head h sees only the branch of its group, so the period is that branch's rate.
  const auto branches = static_cast<int64_t>(dilation_rates.size());
  if (mix == Mix::head_split) check_head_split_heads(heads, branches);
  std::vector<std::string> warnings;
  for (int64_t h = 0; h < heads; ++h) {
    std::vector<int64_t> rates = dilation_rates;
    if (mix == Mix::head_split) rates = {dilation_rates[static_cast<size_t>(head_split_branch(h, heads, branches))]};
    int64_t period = 1;
    for (int64_t r : rates) period = std::lcm(period, r);
    int64_t uncovered = 0;
    for (int64_t p = 0; p < period; ++p) {
      bool covered = false;
      for (int64_t r : rates) covered = covered || (p % r == h % r);
      if (!covered) ++uncovered;
    }
    if (uncovered > 0) {
      warnings.push_back("head " + std::to_string(h) + ": " + std::to_string(uncovered) + " of every " +
                         std::to_string(period) + " positions are selected by no branch and output zeros");
    }
  }
  return warnings;
}

std::pair<int64_t, int64_t> DilatedAttentionConfig::branch_heads(size_t branch, int64_t heads) const {
  if (mix == Mix::lse) return {0, heads};
  const auto K = static_cast<int64_t>(segment_lengths.size()), i = static_cast<int64_t>(branch);
  return {i * heads / K, (i + 1) * heads / K};
}

double DilatedAttentionConfig::forward_flops(int64_t batch, int64_t n, int64_t heads, int64_t head_dim) const {
  double flops = 0;
  const auto K = static_cast<int64_t>(segment_lengths.size());
  for (size_t i = 0; i < segment_lengths.size(); ++i) {
    const int64_t w = std::min(segment_lengths[i], n), r = dilation_rates[i];
    const int64_t full = n / w, tail = n % w;
    const double rows = static_cast<double>((w + r - 1) / r);
    const double tail_rows = static_cast<double>((tail + r - 1) / r);
    // head_split: branch i works for its group of heads only.
    const auto index = static_cast<int64_t>(i);
    const int64_t branch_heads = mix == Mix::head_split ? (index + 1) * heads / K - index * heads / K : heads;
    flops += (static_cast<double>(full) * rows * rows + tail_rows * tail_rows) * static_cast<double>(branch_heads);
  }
  return flops * 4.0 * static_cast<double>(batch * head_dim);
}

namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

std::string dtype_of(const at::Tensor& t) { return std::string(c10::toString(t.scalar_type())); }

// Every tensor that crosses the public API is checked here, so the backends may assume valid inputs.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& options) {
  const std::string where = "dilated_attention: ";
  if (!q.defined() || !k.defined() || !v.defined()) throw Error(where + "q, k and v must be defined tensors");
  if (q.dim() != 4) throw Error(where + "q must have shape (B, N, H, D), got " + shape_of(q));
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  if (N < 1 || H < 1 || D < 1) throw Error(where + "q must have N, H and D >= 1, got " + shape_of(q));
  const std::string kv_shape =
      "(B=" + std::to_string(B) + ", N=" + std::to_string(N) + ", Hkv, D=" + std::to_string(D) + ")";
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    if (t.dim() != 4 || t.size(0) != B || t.size(1) != N || t.size(3) != D || t.size(2) < 1) {
      throw Error(where + name + " must have shape " + kv_shape + " to match q " + shape_of(q) + ", got " +
                  shape_of(t));
    }
  }
  if (v.sizes() != k.sizes()) throw Error(where + "v must have the shape of k " + shape_of(k) + ", got " + shape_of(v));
  if (H % k.size(2) != 0) {
    throw Error(where + "the query heads H=" + std::to_string(H) + " must be a multiple of the key/value heads Hkv=" +
                std::to_string(k.size(2)) + " (q " + shape_of(q) + ", k " + shape_of(k) + ")");
  }
  if (!at::isFloatingType(q.scalar_type())) throw Error(where + "q must be a floating tensor, got " + dtype_of(q));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    if (t.scalar_type() != q.scalar_type()) {
      throw Error(where + name + " has dtype " + dtype_of(t) + " but q has " + dtype_of(q) +
                  " (q, k and v must share one dtype)");
    }
    if (t.device() != q.device()) {
      throw Error(where + name + " is on " + t.device().str() + " but q is on " + q.device().str() +
                  " (q, k and v must share one device)");
    }
  }
  if (options.key_padding_mask) {
    const at::Tensor& mask = *options.key_padding_mask;
    const std::string expected = "(B=" + std::to_string(B) + ", N=" + std::to_string(N) + ") bool";
    if (!mask.defined() || mask.dim() != 2 || mask.size(0) != B || mask.size(1) != N ||
        mask.scalar_type() != at::kBool) {
      throw Error(where + "key_padding_mask must have shape " + expected + ", got " +
                  (mask.defined() ? shape_of(mask) + " " + dtype_of(mask) : std::string("an undefined tensor")));
    }
    if (mask.device() != q.device()) {
      throw Error(where + "key_padding_mask is on " + mask.device().str() + " but q is on " + q.device().str());
    }
  }
  if (options.scale && !std::isfinite(*options.scale)) {
    throw Error(where + "scale must be finite, got " + std::to_string(*options.scale));
  }
  if (options.relative_bias) {
    const RelativePositionBias& bias = *options.relative_bias;
    const at::Tensor& table = bias.table;
    const std::string expected = "(H=" + std::to_string(H) + ", num_buckets=" + std::to_string(bias.num_buckets) + ")";
    if (!table.defined() || table.dim() != 2 || table.size(0) != H || table.size(1) != bias.num_buckets) {
      throw Error(where + "relative_bias.table must have shape " + expected + ", got " +
                  (table.defined() ? shape_of(table) : std::string("an undefined tensor")));
    }
    if (!at::isFloatingType(table.scalar_type())) {
      throw Error(where + "relative_bias.table must be a floating tensor, got " + dtype_of(table));
    }
    if (table.device() != q.device()) {
      throw Error(where + "relative_bias.table is on " + table.device().str() + " but q is on " + q.device().str());
    }
    // T5 bucketing needs at least one exact bucket per direction and a log range beyond the exact ones.
    const int64_t min_buckets = bias.bidirectional ? 4 : 2;
    if (bias.num_buckets < min_buckets) {
      throw Error(where + "relative_bias.num_buckets must be >= " + std::to_string(min_buckets) +
                  (bias.bidirectional ? " when bidirectional" : "") + ", got " + std::to_string(bias.num_buckets));
    }
    const int64_t max_exact = (bias.bidirectional ? bias.num_buckets / 2 : bias.num_buckets) / 2;
    if (bias.max_distance <= max_exact) {
      throw Error(where + "relative_bias.max_distance must exceed the " + std::to_string(max_exact) +
                  " exact buckets, got " + std::to_string(bias.max_distance));
    }
  }
}

}  // namespace

Backend resolve_backend(const at::Tensor& q, const DilatedAttentionConfig& config, const AttentionOptions& options) {
  if (config.backend != Backend::automatic) return config.backend;
  const bool half = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
  if (!q.is_cuda() || !half || options.relative_bias) return Backend::reference;
  // On Hopper with D = 64 the fused forward (TMA, wgmma) beats cuDNN on the strided views and its backward is the
  // flash backend's; elsewhere the fused kernels are exact but slower (bench/results/README.md).
  return fused_backend_preferred(q, options) ? Backend::fused : Backend::flash;
}

AttentionResult dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const DilatedAttentionConfig& config, const AttentionOptions& options) {
  config.validate();
  check_inputs(q, k, v, options);
  if (config.mix == Mix::head_split) {
    check_head_split_heads(q.size(2), static_cast<int64_t>(config.segment_lengths.size()));
  }
  const Backend backend = resolve_backend(q, config, options);
  if (backend == Backend::fused) {
    std::string why;
    if (!fused_backend_supports(q, options, &why)) {
      throw ConfigError("dilated_attention: the fused backend cannot run these inputs: " + why +
                        " (choose 'flash' or 'auto')");
    }
    return fused_dilated_attention(q, k, v, config, options);
  }
  if (backend == Backend::flash) {
    // Never a quiet switch to the reference: inputs the flash backend cannot run are an error naming what is missing.
    std::string why;
    if (!flash_backend_supports(q, options, &why)) {
      throw ConfigError("dilated_attention: the flash backend cannot run these inputs: " + why +
                        (config.backend == Backend::automatic
                             ? " (backend 'auto' picks flash, or fused on Hopper, for CUDA bfloat16/float16 inputs; "
                               "choose 'reference' to run them with torch ops)"
                             : ""));
    }
    return flash_dilated_attention(q, k, v, config, options);
  }
  return reference_dilated_attention(q, k, v, config, options);
}

AttentionResult dilated_attention_packed(const at::Tensor& qkv, int64_t heads, int64_t kv_heads,
                                         const QkvRotation& rotation, const DilatedAttentionConfig& config,
                                         const AttentionOptions& options) {
  if (qkv.defined() && qkv.is_cuda() && qkv.dim() == 3 && qkv.numel() > 0 && heads >= 1 && kv_heads >= 1 &&
      qkv.size(2) % (heads + 2 * kv_heads) == 0) {
    const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / (heads + 2 * kv_heads);
    const at::Tensor q = qkv.narrow(2, 0, heads * D).view({B, N, heads, D});  // a view, to choose the backend
    if (resolve_backend(q, config, options) == Backend::fused && fused_backend_supports(q, options, nullptr)) {
      config.validate();
      const at::Tensor k = qkv.narrow(2, heads * D, kv_heads * D).view({B, N, kv_heads, D});
      check_inputs(q, k, k, options);
      if (config.mix == Mix::head_split) {
        check_head_split_heads(heads, static_cast<int64_t>(config.segment_lengths.size()));
      }
      return fused_dilated_attention_packed(qkv, heads, kv_heads, rotation, config, options);
    }
  }
  const Qkv p = split_qkv(qkv, heads, kv_heads, rotation.cos, rotation.sin, rotation.q_scale, rotation.k_scale);
  return dilated_attention(p.q, p.k, p.v, config, options);
}

}  // namespace longnet::attention
