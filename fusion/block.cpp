#include "fusion/block.h"

#include <cmath>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include "core/error.h"
#include "fusion/checkpoint.h"
#include "fusion/gelu_mlp.h"

namespace longnet::fusion {

attention::MultiheadDilatedAttentionOptions attention_options(const ModelConfig& model, const AttentionConfig& attention) {
  attention::MultiheadDilatedAttentionOptions options{
      .embed_dim = model.width,
      .heads = model.heads,
      .kv_heads = model.kv_heads,
      .dilated = attention.dilated,
      .position = attention.position,
      .qk_layernorm = attention.qk_layernorm,
      .dropout = attention.dropout,
      .bias = attention.bias,
      .sub_layernorm = model.sub_layernorm,
      .rope_theta = attention.rope_theta,
      .xpos_scale_base = attention.xpos_scale_base,
      .relative_num_buckets = attention.relative_num_buckets,
      .relative_max_distance = attention.relative_max_distance,
  };
  options.validate();
  return options;
}

int64_t mlp_hidden_width(const ModelConfig& model) {
  const double hidden = model.mlp_ratio * static_cast<double>(model.width);
  return static_cast<int64_t>(std::llround(model.mlp == MlpKind::swiglu ? hidden * 2.0 / 3.0 : hidden));
}

at::Tensor gelu(MlpKind kind, const at::Tensor& h) {
  return at::gelu(h, kind == MlpKind::gelu_tanh ? "tanh" : "none");
}

TransformerBlockImpl::TransformerBlockImpl(const ModelConfig& model, const AttentionConfig& attention)
    : mlp_kind_(model.mlp),
      dropout_(model.dropout),
      checkpoint_(model.activation_checkpointing),
      autocast_residual_(model.autocast_residual) {
  if (!(model.mlp_ratio > 0.0)) throw ConfigError("model.mlp_ratio must be > 0, got " + std::to_string(model.mlp_ratio));
  if (!(model.dropout >= 0.0 && model.dropout < 1.0)) {
    throw ConfigError("model.dropout must be in [0, 1), got " + std::to_string(model.dropout));
  }
  const int64_t c = model.width;
  const int64_t hidden = mlp_hidden_width(model);
  if (hidden < 1) throw ConfigError("model.mlp_ratio = " + std::to_string(model.mlp_ratio) + " leaves no MLP width");

  attention_norm_ = register_module("attention_norm", LayerNorm(torch::nn::LayerNormOptions({c})));
  attention_ = register_module("attention", attention::MultiheadDilatedAttention(attention_options(model, attention)));
  mlp_norm_ = register_module("mlp_norm", LayerNorm(torch::nn::LayerNormOptions({c})));
  const int64_t fc1_out = mlp_kind_ == MlpKind::swiglu ? 2 * hidden : hidden;
  fc1_ = register_module("fc1", longnet::Linear(torch::nn::LinearOptions(c, fc1_out)));
  if (model.sub_layernorm) {
    mlp_sub_norm_ = register_module("mlp_sub_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({hidden})));
  }
  fc2_ = register_module("fc2", longnet::Linear(torch::nn::LinearOptions(hidden, c)));
}

at::Tensor TransformerBlockImpl::mlp(const at::Tensor& x) {
  if (mlp_kind_ == MlpKind::gelu_tanh && !mlp_sub_norm_ && x.is_cuda() &&
      at::autocast::is_autocast_enabled(at::kCUDA)) {
    // What at::linear does to its operands under autocast, then the whole MLP in three GEMMs each way.
    const auto dtype = at::autocast::get_autocast_dtype(at::kCUDA);
    const auto cast = [dtype](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, at::kCUDA); };
    const at::Tensor xc = cast(x), w1 = cast(fc1_->weight), b1 = cast(fc1_->bias), w2 = cast(fc2_->weight),
                     b2 = cast(fc2_->bias);
    if (gelu_mlp_takes(xc, w1, b1, w2, b2)) return gelu_mlp(xc, w1, b1, w2, b2);
  }
  at::Tensor h;  // (..., hidden)
  if (mlp_kind_ == MlpKind::swiglu) {
    const auto gate_up = fc1_(x).chunk(2, -1);
    h = at::silu(gate_up[0]) * gate_up[1];
  } else {
    h = gelu(mlp_kind_, fc1_(x));
  }
  if (mlp_sub_norm_) h = mlp_sub_norm_(h);
  return fc2_(h);
}

at::Tensor TransformerBlockImpl::forward(const at::Tensor& x, const std::optional<at::Tensor>& key_padding_mask,
                                         const attention::SequenceShard* shard) {
  if (checkpoint_ && is_training()) {
    return checkpointed(
        [this, key_padding_mask, shard](const at::Tensor& h) { return run({h, {}}, key_padding_mask, shard).value(); },
        x);
  }
  return run({x, {}}, key_padding_mask, shard).value();
}

Residual TransformerBlockImpl::forward_stream(const Residual& in, const std::optional<at::Tensor>& key_padding_mask,
                                             const attention::SequenceShard* shard) {
  if (checkpoint_ && is_training()) return {forward(in.value(), key_padding_mask, shard), {}};
  return run(in, key_padding_mask, shard);
}

Residual run_blocks(std::vector<TransformerBlock>& blocks, const at::Tensor& x,
                    const std::optional<at::Tensor>& key_padding_mask, const attention::SequenceShard* shard) {
  Residual h{x, {}};
  for (auto& block : blocks) h = block->forward_stream(h, key_padding_mask, shard);
  return h;
}

Residual TransformerBlockImpl::run(const Residual& in, const std::optional<at::Tensor>& key_padding_mask,
                                   const attention::SequenceShard* shard) {
  // x: (B, N, C); each residual add and the pre-norm after it run as one step (fusion/layer_norm.h).
  at::Tensor x, normed;
  if (in.add.defined()) {
    std::tie(x, normed) = attention_norm_->forward_residual(in.x, in.add);
  } else {
    x = in.x;
    if (autocast_residual_ && at::autocast::is_autocast_enabled(x.device().type())) {
      x = x.to(at::autocast::get_autocast_dtype(x.device().type()));  // the stream enters in the autocast dtype
    }
    normed = attention_norm_(x);
  }
  const auto [y, mlp_normed] = mlp_norm_->forward_residual(
      x, at::dropout(attention_(normed, key_padding_mask, shard), dropout_, is_training()));
  return {y, at::dropout(mlp(mlp_normed), dropout_, is_training())};
}

}  // namespace longnet::fusion
