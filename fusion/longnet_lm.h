// A causal LongNet language model (arXiv:2307.02486 §3):
//   tokens (B, N) → embedding (B, N, C) → depth × TransformerBlock (causal dilated attention) → LayerNorm → logits
// The LM head shares the embedding matrix (logits = h Eᵀ), so the vocabulary costs one (vocab, C) parameter.
//
//   fusion::ModelConfig model{.width = 128, .depth = 2, .heads = 4, .kv_heads = 4, .vocab_size = 256};
//   fusion::AttentionConfig attn{
//       .dilated = {.segment_lengths = {128, 256}, .dilation_rates = {1, 2}, .causal = true},
//       .position = attention::PositionEncoding::rope, .qk_layernorm = false, .dropout = 0.0};
//   fusion::LongNetLM lm(model, attn);
//   auto logits = lm(tokens);                              // tokens: (B, N) int64 → (B, N, vocab) float
//   auto loss = fusion::next_token_loss(logits, tokens);   // scalar
//
// From an experiment: LongNetLM(exp.model, {.dilated = exp.attention.dilated, .position = exp.attention.position,
// .qk_layernorm = exp.attention.qk_layernorm, .dropout = exp.attention.dropout}).
//
// Positions come from the attention (rope, xpos, relative_bias) or from causality alone (none); there is no learned
// absolute position table, so nothing limits N but memory. Initialisation follows GPT-2: embedding N(0, 0.02), so
// that the tied head starts near uniform logits.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "fusion/block.h"
#include "fusion/model_config.h"

namespace longnet::fusion {

class LongNetLMImpl : public torch::nn::Module {
 public:
  // Throws ConfigError when attention.dilated.causal is false (a language model must not see the tokens it
  // predicts), for depth < 1, vocab_size < 1, and for everything TransformerBlock rejects.
  LongNetLMImpl(const ModelConfig& model, const AttentionConfig& attention);

  // tokens: (B, N) int64 in [0, vocab_size); key_padding_mask: (B, N) bool, true = padding → logits (B, N, vocab).
  // With `shard`, tokens are that part of a longer sequence split across processes (sequence parallelism; every
  // process of the group calls forward and backward together; see TransformerBlock::forward).
  at::Tensor forward(const at::Tensor& tokens, const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                     const attention::SequenceShard* shard = nullptr);

  // Distinct trainable parameters (the tied head counts once).
  int64_t num_parameters() const;
  // Approximate training FLOPs per token at sequence length n: 6·num_parameters() (forward + backward of every
  // matmul, the tied head included) + 3 · depth · DilatedAttentionConfig::forward_flops(1, n, H, D) / n.
  double flops_per_token(int64_t n) const;

  const ModelConfig& model_config() const { return model_; }
  const AttentionConfig& attention_config() const { return attention_; }

 private:
  ModelConfig model_;
  AttentionConfig attention_;
  torch::nn::Embedding embedding_{nullptr};  // (vocab, C), also the LM head
  std::vector<TransformerBlock> blocks_;
  LayerNorm final_norm_{nullptr};  // a 16-bit stream stays 16-bit (LayerNorm::forward_keeping_dtype)
};

TORCH_MODULE(LongNetLM);

// Mean cross-entropy of predicting tokens[:, t + 1] from logits[:, t]: logits (B, N, V), tokens (B, N) int64, N ≥ 2.
// Targets that are padding (padding_mask: (B, N) bool, true = padding) are left out of the mean.
at::Tensor next_token_loss(const at::Tensor& logits, const at::Tensor& tokens,
                           const std::optional<at::Tensor>& padding_mask = std::nullopt);

}  // namespace longnet::fusion
