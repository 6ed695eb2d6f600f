#include "fusion/strategies.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include "attention/multihead_dilated_attention.h"
#include "core/device_copy.h"
#include "core/error.h"
#include "core/linear.h"
#include "fusion/checkpoint.h"

namespace longnet::fusion {

using modalities::kAllModalities;
using modalities::kModalityCount;
using modalities::Modality;

namespace {

size_t idx(Modality m) { return static_cast<size_t>(m); }
bool has(uint32_t mask, Modality m) { return (mask >> static_cast<uint32_t>(m)) & 1U; }

// The attention of cross-modality blocks: fusion's dilated pattern, never causal (every token may see every other
// modality), and no rotary or relative positions: the encoders already gave every token its position inside its
// modality, and a distance between a text token and an image patch in the concatenation would mean nothing.
AttentionConfig cross_attention(const StrategyContext& ctx) {
  AttentionConfig a = ctx.attention;
  a.dilated.segment_lengths = ctx.fusion.segment_lengths;
  a.dilated.dilation_rates = ctx.fusion.dilation_rates;
  a.dilated.causal = false;
  a.position = attention::PositionEncoding::none;
  return a;
}

at::TensorOptions options_of(const FusionInput& in) {
  for (const auto& t : in.tokens) {
    if (t.defined()) return t.options();
  }
  throw Error("fusion: no modality has tokens");
}

std::optional<at::Tensor> optional_mask(const at::Tensor& mask) {
  return mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt;
}

// A group's present modalities, concatenated along the sequence: x (G, L, C), padding (G, L) or undefined, and each
// modality's span [start, start + length).
struct Concatenation {
  at::Tensor x, padding;
  std::vector<std::tuple<Modality, int64_t, int64_t>> spans;
};

Concatenation concatenate(const FusionInput& in, uint32_t mask, const at::Tensor& rows) {
  Concatenation c;
  std::vector<at::Tensor> xs, pads;
  bool any_padding = false;
  int64_t start = 0;
  for (Modality m : kAllModalities) {
    if (!has(mask, m)) continue;
    const at::Tensor x = take_rows(in.tokens[idx(m)], rows);
    xs.push_back(x);
    const at::Tensor& pad = in.padding[idx(m)];
    any_padding = any_padding || pad.defined();
    pads.push_back(pad.defined() ? take_rows(pad, rows)
                                 : at::zeros({x.size(0), x.size(1)}, x.options().dtype(at::kBool)));
    c.spans.emplace_back(m, start, x.size(1));
    start += x.size(1);
  }
  c.x = at::cat(xs, 1);
  if (any_padding) c.padding = at::cat(pads, 1);
  return c;
}

void check_input(const FusionInput& in, const std::array<bool, kModalityCount>& enabled) {
  if (!in.present.defined() || in.present.dim() != 2 || in.present.size(1) != kModalityCount) {
    throw Error("fusion: present must be (B, " + std::to_string(kModalityCount) + ") bool");
  }
  for (Modality m : kAllModalities) {
    if (in.tokens[idx(m)].defined() && !enabled[idx(m)]) {
      throw Error("fusion: tokens given for modality " + modalities::to_string(m) + ", which is not enabled");
    }
  }
}

torch::nn::LayerNorm make_norm(int64_t c) { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c})); }
// The norm after a strategy's last block: a 16-bit stream stays 16-bit (LayerNorm::forward_keeping_dtype).
LayerNorm make_output_norm(int64_t c) { return LayerNorm(torch::nn::LayerNormOptions({c})); }

// ---- concat_seq ----------------------------------------------------------------------------------------------------

class ConcatSeqFusion : public FusionStrategyImpl {
 public:
  explicit ConcatSeqFusion(const StrategyContext& ctx) : ctx_(ctx), cross_(cross_attention(ctx)) {
    for (int64_t i = 0; i < ctx.fusion.depth; ++i) {
      blocks_.push_back(register_module("block" + std::to_string(i), TransformerBlock(ctx.model, cross_)));
    }
    norm_ = register_module("norm", make_output_norm(ctx.model.width));
  }

  at::Tensor forward(const FusionInput& in) override {
    check_input(in, ctx_.enabled);
    at::Tensor out = at::zeros({in.present.size(0), ctx_.model.width}, options_of(in));
    for (const auto& [mask, rows] : presence_groups(in.present, out.device())) {
      Concatenation c = concatenate(in, mask, rows);
      c.x = run_blocks(blocks_, c.x, optional_mask(c.padding)).value();
      out = put_rows(out, rows, masked_mean(norm_->forward_keeping_dtype(c.x), c.padding));
    }
    return out;
  }

  double forward_flops(const std::array<int64_t, kModalityCount>& lengths) const override {
    int64_t n = 0;
    for (int64_t l : lengths) n += l;
    double total = 0;
    for (const auto& block : blocks_) total += block_forward_flops(*block, ctx_.model, &cross_.dilated, n);
    return total;
  }

 private:
  StrategyContext ctx_;
  AttentionConfig cross_;
  std::vector<TransformerBlock> blocks_;
  LayerNorm norm_{nullptr};
};

// ---- multiway ------------------------------------------------------------------------------------------------------

// A pre-norm block with one shared attention over the whole fused sequence and one feed-forward expert per modality,
// each applied to its modality's span only.
class MultiwayBlockImpl : public torch::nn::Module {
 public:
  MultiwayBlockImpl(const StrategyContext& ctx, const AttentionConfig& cross) : model_(ctx.model) {
    const int64_t c = ctx.model.width, hidden = mlp_hidden_width(ctx.model);
    attention_norm_ = register_module("attention_norm", make_norm(c));
    attention_ = register_module("attention",
                                 attention::MultiheadDilatedAttention(attention_options(ctx.model, cross)));
    for (Modality m : kAllModalities) {
      if (!ctx.enabled[idx(m)]) continue;
      const std::string name = modalities::to_string(m);
      Expert& e = experts_[idx(m)];
      e.norm = register_module(name + "_norm", make_norm(c));
      const int64_t fc1_out = model_.mlp == MlpKind::swiglu ? 2 * hidden : hidden;
      e.fc1 = register_module(name + "_fc1", longnet::Linear(c, fc1_out));
      e.fc2 = register_module(name + "_fc2", longnet::Linear(hidden, c));
    }
  }

  at::Tensor forward(const Concatenation& c, const at::Tensor& x) {
    if (model_.activation_checkpointing && is_training()) {
      // The rerun happens after this call returns: it keeps its own copy of the padding and spans.
      return checkpointed(
          [this, padding = c.padding, spans = c.spans](const at::Tensor& h) { return run(padding, spans, h); }, x);
    }
    return run(c.padding, c.spans, x);
  }

  at::Tensor run(const at::Tensor& padding, const std::vector<std::tuple<Modality, int64_t, int64_t>>& spans,
                 const at::Tensor& x) {
    const at::Tensor y = x + at::dropout(attention_(attention_norm_(x), optional_mask(padding)), model_.dropout,
                                         is_training());
    std::vector<at::Tensor> parts;
    for (const auto& [m, start, length] : spans) {
      const at::Tensor seg = y.narrow(1, start, length);
      parts.push_back(seg + at::dropout(expert(m, seg), model_.dropout, is_training()));
    }
    return at::cat(parts, 1);
  }

  double forward_flops(const AttentionConfig& cross, const std::array<int64_t, kModalityCount>& lengths) const {
    int64_t n = 0;
    for (int64_t l : lengths) n += l;
    double total = block_forward_flops(*attention_, model_, &cross.dilated, n);
    for (Modality m : kAllModalities) {
      const Expert& e = experts_[idx(m)];
      if (!e.fc1 || lengths[idx(m)] == 0) continue;
      total += block_forward_flops(*e.fc1, model_, nullptr, lengths[idx(m)]) +
               block_forward_flops(*e.fc2, model_, nullptr, lengths[idx(m)]);
    }
    return total;
  }

 private:
  struct Expert {
    torch::nn::LayerNorm norm{nullptr};
    longnet::Linear fc1{nullptr}, fc2{nullptr};
  };

  at::Tensor expert(Modality m, const at::Tensor& x) {
    Expert& e = experts_[idx(m)];
    const at::Tensor h = e.fc1(e.norm(x));
    if (model_.mlp == MlpKind::swiglu) {
      const auto gate_up = h.chunk(2, -1);
      return e.fc2(at::silu(gate_up[0]) * gate_up[1]);
    }
    return e.fc2(gelu(model_.mlp, h));
  }

  ModelConfig model_;
  torch::nn::LayerNorm attention_norm_{nullptr};
  attention::MultiheadDilatedAttention attention_{nullptr};
  std::array<Expert, kModalityCount> experts_;
};

TORCH_MODULE(MultiwayBlock);

class MultiwayFusion : public FusionStrategyImpl {
 public:
  explicit MultiwayFusion(const StrategyContext& ctx) : ctx_(ctx), cross_(cross_attention(ctx)) {
    for (int64_t i = 0; i < ctx.fusion.depth; ++i) {
      blocks_.push_back(register_module("block" + std::to_string(i), MultiwayBlock(ctx, cross_)));
    }
    norm_ = register_module("norm", make_output_norm(ctx.model.width));
  }

  at::Tensor forward(const FusionInput& in) override {
    check_input(in, ctx_.enabled);
    at::Tensor out = at::zeros({in.present.size(0), ctx_.model.width}, options_of(in));
    for (const auto& [mask, rows] : presence_groups(in.present, out.device())) {
      const Concatenation c = concatenate(in, mask, rows);
      at::Tensor x = c.x;
      for (auto& block : blocks_) x = block->forward(c, x);
      out = put_rows(out, rows, masked_mean(norm_->forward_keeping_dtype(x), c.padding));
    }
    return out;
  }

  double forward_flops(const std::array<int64_t, kModalityCount>& lengths) const override {
    double total = 0;
    for (const auto& block : blocks_) total += block->forward_flops(cross_, lengths);
    return total;
  }

 private:
  StrategyContext ctx_;
  AttentionConfig cross_;
  std::vector<MultiwayBlock> blocks_;
  LayerNorm norm_{nullptr};
};

// ---- late ----------------------------------------------------------------------------------------------------------

class LateFusion : public FusionStrategyImpl {
 public:
  explicit LateFusion(const StrategyContext& ctx) : ctx_(ctx) {
    const int64_t c = ctx.model.width;
    for (Modality m : kAllModalities) {
      if (ctx.enabled[idx(m)]) {
        projections_[idx(m)] = register_module(modalities::to_string(m) + "_projection", longnet::Linear(c, c));
      }
    }
    gates_ = register_parameter("gates", torch::zeros({kModalityCount}));  // equal weights at the start
    norm_ = register_module("norm", make_norm(c));
  }

  at::Tensor forward(const FusionInput& in) override {
    check_input(in, ctx_.enabled);
    const at::TensorOptions opts = options_of(in);
    // Weights softmax-normalised over each sample's present modalities (absent ones get exactly 0).
    const at::Tensor present = to_device_async(in.present, opts.device());
    const at::Tensor weights = at::where(present, gates_.exp().unsqueeze(0), at::zeros({}, gates_.options()));
    const at::Tensor normalised = weights / weights.sum(1, true);  // (B, M)
    at::Tensor joint = at::zeros({in.present.size(0), ctx_.model.width}, opts);
    for (Modality m : kAllModalities) {
      const at::Tensor& tokens = in.tokens[idx(m)];
      if (!tokens.defined()) continue;
      const at::Tensor h = projections_[idx(m)](masked_mean(tokens, in.padding[idx(m)]));  // (B, C)
      const at::Tensor term = normalised.select(1, static_cast<int64_t>(idx(m))).unsqueeze(1) * h;
      // where, not only the zero weight: a non-finite value in an absent row must not leak through 0 · inf.
      joint = joint + at::where(present.select(1, static_cast<int64_t>(idx(m))).unsqueeze(1), term,
                                at::zeros({}, term.options()));
    }
    return norm_(joint);
  }

  double forward_flops(const std::array<int64_t, kModalityCount>& lengths) const override {
    double total = 0;
    for (Modality m : kAllModalities) {
      if (projections_[idx(m)] && lengths[idx(m)] > 0) {
        total += block_forward_flops(*projections_[idx(m)], ctx_.model, nullptr, 1);
      }
    }
    return total;
  }

 private:
  StrategyContext ctx_;
  std::array<longnet::Linear, kModalityCount> projections_{nullptr, nullptr, nullptr, nullptr};
  at::Tensor gates_;
  torch::nn::LayerNorm norm_{nullptr};
};

// ---- concat_feature ------------------------------------------------------------------------------------------------

// Adaptive average pooling of n positions to t bins with torch's bin edges ([floor(i·n/t), ceil((i+1)·n/t))), as a
// (t, n) 0/1 matrix so that padding can be masked out of each bin.
at::Tensor pooling_bins(int64_t n, int64_t t, const at::TensorOptions& opts) {
  const at::Tensor i = at::arange(t, opts.dtype(at::kLong)).unsqueeze(1);
  const at::Tensor pos = at::arange(n, opts.dtype(at::kLong)).unsqueeze(0);
  const at::Tensor start = at::div(i * n, t, "floor");
  const at::Tensor end = at::div((i + 1) * n + t - 1, t, "floor");
  return (pos.ge(start) & pos.lt(end)).to(opts.dtype());
}

class ConcatFeatureFusion : public FusionStrategyImpl {
 public:
  explicit ConcatFeatureFusion(const StrategyContext& ctx) : ctx_(ctx), cross_(cross_attention(ctx)) {
    int64_t count = 0;
    for (bool e : ctx.enabled) count += e ? 1 : 0;
    projection_ = register_module("projection", longnet::Linear(count * ctx.model.width, ctx.model.width));
    for (int64_t i = 0; i < ctx.fusion.depth; ++i) {
      blocks_.push_back(register_module("block" + std::to_string(i), TransformerBlock(ctx.model, cross_)));
    }
    norm_ = register_module("norm", make_norm(ctx.model.width));
  }

  at::Tensor forward(const FusionInput& in) override {
    check_input(in, ctx_.enabled);
    const at::TensorOptions opts = options_of(in);
    const int64_t b = in.present.size(0), t = ctx_.fusion.pooled_length, c = ctx_.model.width;
    const at::Tensor present = to_device_async(in.present, opts.device());
    std::vector<at::Tensor> features;
    for (Modality m : kAllModalities) {
      if (!ctx_.enabled[idx(m)]) continue;
      const at::Tensor& tokens = in.tokens[idx(m)];
      if (!tokens.defined()) {
        features.push_back(at::zeros({b, t, c}, opts));
        continue;
      }
      at::Tensor bins = pooling_bins(tokens.size(1), t, opts).unsqueeze(0);  // (1, T, N)
      if (in.padding[idx(m)].defined()) bins = bins * in.padding[idx(m)].logical_not().to(opts.dtype()).unsqueeze(1);
      const at::Tensor counts = bins.sum(-1, true).clamp_min(1.0);           // (B, T, 1)
      const at::Tensor pooled = at::matmul(bins.expand({b, t, tokens.size(1)}), tokens) / counts;  // (B, T, C)
      // An absent modality is zeros, exactly as when the batch has none of it.
      features.push_back(at::where(present.select(1, static_cast<int64_t>(idx(m))).view({b, 1, 1}), pooled,
                                   at::zeros({}, opts)));
    }
    at::Tensor x = projection_(at::cat(features, -1));  // (B, T, C)
    x = run_blocks(blocks_, x).value();
    return norm_(x).mean(1);
  }

  double forward_flops(const std::array<int64_t, kModalityCount>& lengths) const override {
    const int64_t t = ctx_.fusion.pooled_length;
    double total = block_forward_flops(*projection_, ctx_.model, nullptr, t);
    for (int64_t n : lengths) total += 2.0 * static_cast<double>(t * n * ctx_.model.width);
    for (const auto& block : blocks_) total += block_forward_flops(*block, ctx_.model, &cross_.dilated, t);
    return total;
  }

 private:
  StrategyContext ctx_;
  AttentionConfig cross_;
  longnet::Linear projection_{nullptr};
  std::vector<TransformerBlock> blocks_;
  torch::nn::LayerNorm norm_{nullptr};
};

// ---- bottleneck ----------------------------------------------------------------------------------------------------

class BottleneckFusion : public FusionStrategyImpl {
 public:
  explicit BottleneckFusion(const StrategyContext& ctx) : ctx_(ctx), cross_(cross_attention(ctx)) {
    tokens_ = register_parameter("tokens", torch::randn({ctx.fusion.bottleneck_tokens, ctx.model.width}) * 0.02);
    for (int64_t layer = 0; layer < ctx.fusion.depth; ++layer) {
      std::array<TransformerBlock, kModalityCount> blocks{nullptr, nullptr, nullptr, nullptr};
      for (Modality m : kAllModalities) {
        if (!ctx.enabled[idx(m)]) continue;
        blocks[idx(m)] = register_module("layer" + std::to_string(layer) + "_" + modalities::to_string(m),
                                         TransformerBlock(ctx.model, cross_));
      }
      layers_.push_back(blocks);
    }
    norm_ = register_module("norm", make_output_norm(ctx.model.width));
  }

  at::Tensor forward(const FusionInput& in) override {
    check_input(in, ctx_.enabled);
    const at::TensorOptions opts = options_of(in);
    const int64_t nb = ctx_.fusion.bottleneck_tokens;
    at::Tensor out = at::zeros({in.present.size(0), ctx_.model.width}, opts);
    for (const auto& [mask, rows] : presence_groups(in.present, opts.device())) {
      const int64_t g = rows.size(0);
      std::array<at::Tensor, kModalityCount> xs, pads;
      for (Modality m : kAllModalities) {
        if (!has(mask, m)) continue;
        xs[idx(m)] = take_rows(in.tokens[idx(m)], rows);
        if (in.padding[idx(m)].defined()) {
          pads[idx(m)] = at::cat({take_rows(in.padding[idx(m)], rows),
                                  at::zeros({g, nb}, opts.dtype(at::kBool))}, 1);  // the bottleneck is never padding
        }
      }
      at::Tensor z = tokens_.to(opts.dtype()).unsqueeze(0).expand({g, nb, ctx_.model.width});
      for (auto& layer : layers_) {
        std::vector<at::Tensor> updates;
        for (Modality m : kAllModalities) {
          if (!has(mask, m)) continue;
          const int64_t n = xs[idx(m)].size(1);
          const at::Tensor y = layer[idx(m)](at::cat({xs[idx(m)], z}, 1), optional_mask(pads[idx(m)]));
          xs[idx(m)] = y.narrow(1, 0, n);
          updates.push_back(y.narrow(1, n, nb));
        }
        z = at::stack(updates).mean(0);  // the bottleneck carries what the modalities share
      }
      out = put_rows(out, rows, norm_->forward_keeping_dtype(z).mean(1));
    }
    return out;
  }

  double forward_flops(const std::array<int64_t, kModalityCount>& lengths) const override {
    double total = 0;
    for (const auto& layer : layers_) {
      for (Modality m : kAllModalities) {
        if (layer[idx(m)] && lengths[idx(m)] > 0) {
          total += block_forward_flops(*layer[idx(m)], ctx_.model, &cross_.dilated,
                                       lengths[idx(m)] + ctx_.fusion.bottleneck_tokens);
        }
      }
    }
    return total;
  }

 private:
  StrategyContext ctx_;
  AttentionConfig cross_;
  at::Tensor tokens_;  // (bottleneck_tokens, C)
  std::vector<std::array<TransformerBlock, kModalityCount>> layers_;
  LayerNorm norm_{nullptr};
};

// ---- registry ------------------------------------------------------------------------------------------------------

struct Registry {
  std::vector<std::string> names;
  std::map<std::string, StrategyFactory> factories;
};

template <typename T>
StrategyFactory factory_of() {
  return [](const StrategyContext& ctx) -> std::shared_ptr<FusionStrategyImpl> { return std::make_shared<T>(ctx); };
}

Registry& registry() {
  static Registry r = [] {
    Registry built_in;
    built_in.names = {"concat_seq", "concat_feature", "multiway", "late", "bottleneck"};
    built_in.factories = {{"concat_seq", factory_of<ConcatSeqFusion>()},
                          {"concat_feature", factory_of<ConcatFeatureFusion>()},
                          {"multiway", factory_of<MultiwayFusion>()},
                          {"late", factory_of<LateFusion>()},
                          {"bottleneck", factory_of<BottleneckFusion>()}};
    return built_in;
  }();
  return r;
}

}  // namespace

void register_strategy(const std::string& name, StrategyFactory factory) {
  Registry& r = registry();
  if (!r.factories.count(name)) r.names.push_back(name);
  r.factories[name] = std::move(factory);
}

std::vector<std::string> registered_strategies() { return registry().names; }

std::shared_ptr<FusionStrategyImpl> make_strategy(const StrategyContext& context) {
  const Registry& r = registry();
  const auto it = r.factories.find(context.fusion.strategy);
  if (it == r.factories.end()) {
    std::string known;
    for (const auto& n : r.names) known += (known.empty() ? "" : ", ") + n;
    throw ConfigError("fusion.strategy \"" + context.fusion.strategy + "\" is not one of " + known);
  }
  if (std::none_of(context.enabled.begin(), context.enabled.end(), [](bool e) { return e; })) {
    throw ConfigError("fusion: no modality is enabled");
  }
  if (context.fusion.depth < 0 || context.fusion.bottleneck_tokens < 1 || context.fusion.pooled_length < 1) {
    throw ConfigError("fusion: depth must be >= 0, bottleneck_tokens and pooled_length >= 1");
  }
  return it->second(context);
}

at::Tensor masked_mean(const at::Tensor& x, const at::Tensor& padding) {
  if (!padding.defined()) return x.mean(1);
  // Sums and counts in float32 at least: a 16-bit count of 33K tokens would be off by a few tokens.
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor keep = padding.logical_not().unsqueeze(-1);  // (B, N, 1)
  return ((x * keep).sum(1, false, acc) / keep.sum(1).clamp_min(1).to(acc)).to(x.scalar_type());
}

std::vector<std::pair<uint32_t, at::Tensor>> presence_groups(const at::Tensor& present, at::Device device) {
  const at::Tensor flags = present.to(at::kCPU, at::kBool).contiguous();
  const auto a = flags.accessor<bool, 2>();
  std::map<uint32_t, std::vector<int64_t>> groups;
  for (int64_t row = 0; row < flags.size(0); ++row) {
    uint32_t mask = 0;
    for (int64_t m = 0; m < flags.size(1); ++m) mask |= a[row][m] ? (1U << m) : 0U;
    if (mask == 0) throw DataError("fusion: sample " + std::to_string(row) + " has no present modality");
    groups[mask].push_back(row);
  }
  std::vector<std::pair<uint32_t, at::Tensor>> out;
  for (auto& [mask, rows] : groups) {
    out.emplace_back(mask, to_device_async(at::tensor(rows, at::kLong), device));
  }
  return out;
}

at::Tensor take_rows(const at::Tensor& t, const at::Tensor& rows) {
  return rows.size(0) == t.size(0) ? t : t.index_select(0, rows);
}

at::Tensor put_rows(const at::Tensor& t, const at::Tensor& rows, const at::Tensor& values) {
  return rows.size(0) == t.size(0) && values.sizes() == t.sizes() ? values : t.index_copy(0, rows, values);
}

double block_forward_flops(const torch::nn::Module& block, const ModelConfig& model,
                           const attention::DilatedAttentionConfig* dilated, int64_t n) {
  int64_t matrix = 0;
  for (const auto& p : block.parameters()) {
    if (p.dim() == 2) matrix += p.numel();
  }
  double total = 2.0 * static_cast<double>(n) * static_cast<double>(matrix);
  if (dilated != nullptr && n > 0) total += dilated->forward_flops(1, n, model.heads, model.width / model.heads);
  return total;
}

}  // namespace longnet::fusion
