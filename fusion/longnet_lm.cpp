#include "fusion/longnet_lm.h"

#include <string>

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include "core/error.h"

namespace longnet::fusion {

LongNetLMImpl::LongNetLMImpl(const ModelConfig& model, const AttentionConfig& attention)
    : model_(model), attention_(attention) {
  if (!attention_.dilated.causal) {
    throw ConfigError("LongNetLM is a causal language model: attention.causal must be true (otherwise every position "
                      "sees the token it predicts)");
  }
  if (model_.depth < 1) throw ConfigError("model.depth must be >= 1, got " + std::to_string(model_.depth));
  if (model_.vocab_size < 1) throw ConfigError("model.vocab_size must be >= 1, got " + std::to_string(model_.vocab_size));

  embedding_ = register_module("embedding", torch::nn::Embedding(model_.vocab_size, model_.width));
  // GPT-2's N(0, 0.02): torch's N(0, 1) would give the tied head logits of size ~sqrt(C) at the start.
  torch::nn::init::normal_(embedding_->weight, 0.0, 0.02);
  blocks_.reserve(static_cast<size_t>(model_.depth));
  for (int64_t i = 0; i < model_.depth; ++i) {
    blocks_.push_back(register_module("block" + std::to_string(i), TransformerBlock(model_, attention_)));
  }
  final_norm_ = register_module("final_norm", LayerNorm(torch::nn::LayerNormOptions({model_.width})));
}

at::Tensor LongNetLMImpl::forward(const at::Tensor& tokens, const std::optional<at::Tensor>& key_padding_mask,
                                  const attention::SequenceShard* shard) {
  if (tokens.dim() != 2 || tokens.scalar_type() != at::kLong) {
    throw Error("LongNetLM: tokens must be (B, N) int64, got " + std::to_string(tokens.dim()) + " dims of " +
                std::string(c10::toString(tokens.scalar_type())));
  }
  const at::Tensor h =
      final_norm_->forward_keeping_dtype(run_blocks(blocks_, embedding_(tokens), key_padding_mask, shard).value());
  return at::linear(h, embedding_->weight);  // (B, N, vocab): the head is the embedding, transposed
}

int64_t LongNetLMImpl::num_parameters() const {
  int64_t total = 0;
  for (const auto& p : parameters()) total += p.numel();
  return total;
}

double LongNetLMImpl::flops_per_token(int64_t n) const {
  if (n < 1) throw Error("LongNetLM::flops_per_token: n must be >= 1, got " + std::to_string(n));
  const int64_t head_dim = model_.width / model_.heads;
  const double attention_forward = attention_.dilated.forward_flops(1, n, model_.heads, head_dim);
  // backward costs twice the forward, as for the matmuls behind the 6·params term
  return 6.0 * static_cast<double>(num_parameters()) +
         3.0 * static_cast<double>(model_.depth) * attention_forward / static_cast<double>(n);
}

at::Tensor next_token_loss(const at::Tensor& logits, const at::Tensor& tokens, const std::optional<at::Tensor>& padding_mask) {
  if (logits.dim() != 3 || tokens.dim() != 2 || logits.size(0) != tokens.size(0) || logits.size(1) != tokens.size(1) ||
      tokens.size(1) < 2) {
    throw Error("next_token_loss: logits must be (B, N, V) and tokens (B, N) with N >= 2");
  }
  const int64_t n = tokens.size(1), vocab = logits.size(2);
  const at::Tensor predicted = logits.narrow(1, 0, n - 1).reshape({-1, vocab});  // (B·(N-1), V)
  at::Tensor targets = tokens.narrow(1, 1, n - 1).reshape({-1});                 // (B·(N-1),)
  constexpr int64_t kIgnore = -100;
  if (padding_mask) targets = targets.masked_fill(padding_mask->narrow(1, 1, n - 1).reshape({-1}), kIgnore);
  return at::cross_entropy_loss(predicted, targets, /*weight=*/{}, at::Reduction::Mean, kIgnore);
}

}  // namespace longnet::fusion
