// The pre-norm transformer block of every LongNet stack:
//   x = x + dropout(attention(LayerNorm(x)))
//   x = x + dropout(mlp(LayerNorm(x)))
// mlp: GELU: W2 gelu(W1 x), hidden = mlp_ratio·C (gelu_tanh: the tanh approximation, whose MLP runs under CUDA
// autocast as GEMMs with the biases and the GELU in their epilogues, fusion/gelu_mlp.h); SwiGLU: W2 (silu(Wg x) ⊙
// Wu x), hidden = round(2/3 · mlp_ratio·C) (LLaMA's choice, which keeps the parameter count of the GELU MLP). With
// sub_layernorm a LayerNorm over the hidden width precedes W2, and another one precedes the attention's out
// projection (Magneto, arXiv:2210.06423).
//
//   fusion::ModelConfig model{.width = 128, .heads = 4, .kv_heads = 4};
//   fusion::AttentionConfig attn{.dilated = {.segment_lengths = {64}, .dilation_rates = {1}, .causal = true}};
//   fusion::TransformerBlock block(model, attn);
//   auto y = block(x);                       // x: (B, N, C) → (B, N, C)
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "attention/dilated_attention.h"
#include "attention/multihead_dilated_attention.h"
#include "core/linear.h"
#include "fusion/layer_norm.h"
#include "fusion/model_config.h"

namespace longnet::fusion {

// The attention of a block beyond what ModelConfig fixes: width, heads, kv_heads and sub_layernorm come from
// ModelConfig, everything else from here. One field per [attention] setting of an experiment.
struct AttentionConfig {
  attention::DilatedAttentionConfig dilated;
  attention::PositionEncoding position = attention::PositionEncoding::rope;
  bool qk_layernorm = false;
  double dropout = 0.0;  // on attention outputs, in [0, 1)
  bool bias = true;      // q, k, v, out projection biases
  double rope_theta = 10000.0;
  double xpos_scale_base = 512.0;
  int64_t relative_num_buckets = 32;
  int64_t relative_max_distance = 128;
};

// A value of the residual stream, x + add, with the add left to whoever reads it next: a block's pre-norm does it
// in its own kernel each way (LayerNorm::forward_residual), which saves a pass over the stream forward and another
// backward (the gradient of x otherwise reaches it from two uses and is summed). Undefined add: x itself.
struct Residual {
  at::Tensor x, add;
  at::Tensor value() const { return add.defined() ? x + add : x; }
};

// The options of a block's MultiheadDilatedAttention (validated: throws ConfigError like
// MultiheadDilatedAttentionOptions::validate).
attention::MultiheadDilatedAttentionOptions attention_options(const ModelConfig& model, const AttentionConfig& attention);

// The MLP's hidden width: mlp_ratio·C for GELU, round(2/3·mlp_ratio·C) for SwiGLU.
int64_t mlp_hidden_width(const ModelConfig& model);

// The activation of a GELU MLP kind: exact for gelu, the tanh approximation for gelu_tanh.
at::Tensor gelu(MlpKind kind, const at::Tensor& h);

class TransformerBlockImpl : public torch::nn::Module {
 public:
  // Throws ConfigError for an invalid combination (see attention_options; mlp_ratio ≤ 0; dropout outside [0, 1)).
  TransformerBlockImpl(const ModelConfig& model, const AttentionConfig& attention);

  // x: (B, N, C); key_padding_mask: (B, N) bool, true = padding → (B, N, C). With `shard` (which must outlive the
  // backward: an activation-checkpointed block recomputes through it), x is that part of a longer sequence.
  at::Tensor forward(const at::Tensor& x, const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                     const attention::SequenceShard* shard = nullptr);

  // forward() on in.value(), its output returned as y + the MLP branch with that add left to the next block's norm
  // (run_blocks). An activation-checkpointed block takes and returns whole values.
  Residual forward_stream(const Residual& in, const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                          const attention::SequenceShard* shard = nullptr);

  // The MLP branch alone (without norm, dropout and residual): (..., C) → (..., C).
  at::Tensor mlp(const at::Tensor& x);

  attention::MultiheadDilatedAttention& attention() { return attention_; }
  LayerNorm& attention_norm() { return attention_norm_; }
  LayerNorm& mlp_norm() { return mlp_norm_; }

 private:
  // The block on in.value(), its MLP branch's residual add left in the result (forward_stream without checkpointing).
  Residual run(const Residual& in, const std::optional<at::Tensor>& key_padding_mask,
               const attention::SequenceShard* shard);

  MlpKind mlp_kind_;
  double dropout_;
  bool checkpoint_;
  bool autocast_residual_;  // ModelConfig::autocast_residual
  LayerNorm attention_norm_{nullptr}, mlp_norm_{nullptr};  // outputs in the autocast dtype (fusion/layer_norm.h)
  attention::MultiheadDilatedAttention attention_{nullptr};
  longnet::Linear fc1_{nullptr};  // C → hidden (GELU) or C → 2·hidden, [gate | up] in one matmul (SwiGLU)
  longnet::Linear fc2_{nullptr};  // hidden → C
  torch::nn::LayerNorm mlp_sub_norm_{nullptr};  // sub_layernorm only
};

TORCH_MODULE(TransformerBlock);

// The blocks one after another on x: what calling each in turn gives, with each block's last residual add done in
// the next block's pre-norm. The result's add is left to the caller (Residual::value, or a norm).
Residual run_blocks(std::vector<TransformerBlock>& blocks, const at::Tensor& x,
                    const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                    const attention::SequenceShard* shard = nullptr);

}  // namespace longnet::fusion
