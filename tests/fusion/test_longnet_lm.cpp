// LongNetLM on CPU: shapes, tied head, parameter and FLOP counts, causality through the whole model for every
// position encoding, the next-token loss, gradients, and a few AdamW steps on a repeated byte pattern.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "core/error.h"
#include "fusion/longnet_lm.h"
#include "tests/support/single_threaded.h"

using namespace longnet;
using namespace longnet::fusion;

namespace {

ModelConfig tiny_model() {
  return ModelConfig{.width = 16, .depth = 2, .heads = 4, .kv_heads = 2, .mlp = MlpKind::swiglu, .mlp_ratio = 2.0,
                     .vocab_size = 32};
}

AttentionConfig causal_attention(attention::PositionEncoding position = attention::PositionEncoding::rope) {
  return AttentionConfig{
      .dilated = {.segment_lengths = {4, 8}, .dilation_rates = {1, 2}, .causal = true,
                  .backend = attention::Backend::reference},
      .position = position};
}

LongNetLM make_lm(const ModelConfig& model, const AttentionConfig& attention, uint64_t seed = 3) {
  torch::manual_seed(seed);
  LongNetLM lm(model, attention);
  lm->to(torch::kDouble);
  return lm;
}

at::Tensor random_tokens(int64_t b, int64_t n, int64_t vocab, uint64_t seed = 4) {
  torch::manual_seed(seed);
  return torch::randint(vocab, {b, n}, torch::kLong);
}

}  // namespace

TEST_CASE("LM logits have shape (B, N, vocab) and the head is the embedding", "[fusion][cpu]") {
  auto lm = make_lm(tiny_model(), causal_attention());
  const at::Tensor tokens = random_tokens(3, 12, 32);
  const at::Tensor logits = lm(tokens);
  REQUIRE(logits.sizes() == at::IntArrayRef{3, 12, 32});
  REQUIRE(logits.scalar_type() == at::kDouble);
  // Scaling one embedding row scales that token's logit column after the final LayerNorm (the head reads it).
  const auto params = lm->named_parameters();
  REQUIRE(params.contains("embedding.weight"));
  for (const auto& item : params) REQUIRE(item.key().find("head") == std::string::npos);
  const at::Tensor unused_token_row = params["embedding.weight"][31];
  const at::Tensor tokens_without_31 = tokens.masked_fill(tokens.eq(31), 0);
  const at::Tensor before = lm(tokens_without_31);
  {
    torch::NoGradGuard no_grad;
    unused_token_row.mul_(2.0);
  }
  const at::Tensor after = lm(tokens_without_31);
  REQUIRE(torch::allclose(after.select(-1, 31), 2.0 * before.select(-1, 31), 1e-10, 1e-10));
  REQUIRE(torch::allclose(after.narrow(-1, 0, 31), before.narrow(-1, 0, 31), 1e-10, 1e-10));
}

TEST_CASE("parameter count of width 128, depth 2, heads 4 (tied head counted once)", "[fusion][cpu]") {
  ModelConfig model{.width = 128, .depth = 2, .heads = 4, .kv_heads = 4, .mlp = MlpKind::gelu, .mlp_ratio = 4.0,
                    .vocab_size = 256};
  AttentionConfig attention = causal_attention();
  // embedding 256·128; per block: 2 LayerNorms 2·256, q/k/v/out 4·(128·128 + 128), fc1 128·512 + 512,
  // fc2 512·128 + 128; final LayerNorm 256.
  const int64_t per_block = 2 * 256 + 4 * (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128);
  const int64_t expected = 256 * 128 + 2 * per_block + 256;
  REQUIRE(expected == 429568);
  REQUIRE(LongNetLM(model, attention)->num_parameters() == expected);
  SECTION("grouped-query heads shrink k and v") {
    model.kv_heads = 1;
    REQUIRE(LongNetLM(model, attention)->num_parameters() == expected - 2 * 2 * (3 * 32 * 128 + 3 * 32));
  }
  SECTION("relative bias adds an (H, 32) table per block") {
    attention.position = attention::PositionEncoding::relative_bias;
    REQUIRE(LongNetLM(model, attention)->num_parameters() == expected + 2 * 4 * 32);
  }
}

TEST_CASE("FLOPs per token: 6·params + attention forward and backward", "[fusion][cpu]") {
  const auto model = tiny_model();
  const auto attention = causal_attention();
  auto lm = make_lm(model, attention);
  const int64_t n = 64;
  const double attention_flops = attention.dilated.forward_flops(1, n, 4, 4);
  REQUIRE(attention_flops > 0.0);
  REQUIRE(lm->flops_per_token(n) ==
          Approx(6.0 * static_cast<double>(lm->num_parameters()) + 3.0 * 2 * attention_flops / n));
  REQUIRE_THROWS_AS(lm->flops_per_token(0), Error);
}

TEST_CASE("LM is causal: future tokens leave earlier logits unchanged", "[fusion][cpu]") {
  const auto position = GENERATE(attention::PositionEncoding::none, attention::PositionEncoding::rope,
                                 attention::PositionEncoding::xpos, attention::PositionEncoding::relative_bias);
  CAPTURE(attention::to_string(position));
  auto model = tiny_model();
  auto attention = causal_attention(position);
  attention.qk_layernorm = true;
  model.sub_layernorm = true;
  auto lm = make_lm(model, attention);
  const int64_t n = 15, t = 7;
  const at::Tensor tokens = random_tokens(2, n, 32);
  at::Tensor changed = tokens.clone();
  changed.narrow(1, t + 1, n - t - 1).copy_((tokens.narrow(1, t + 1, n - t - 1) + 5) % 32);
  const at::Tensor a = lm(tokens), b = lm(changed);
  REQUIRE(torch::allclose(a.narrow(1, 0, t + 1), b.narrow(1, 0, t + 1), 1e-10, 1e-10));
  REQUIRE_FALSE(torch::allclose(a.narrow(1, t + 1, 1), b.narrow(1, t + 1, 1), 1e-6, 1e-6));
}

TEST_CASE("a language model must be causal", "[fusion][cpu]") {
  auto attention = causal_attention();
  attention.dilated.causal = false;
  REQUIRE_THROWS_WITH(LongNetLM(tiny_model(), attention),
                      "LongNetLM is a causal language model: attention.causal must be true (otherwise every "
                      "position sees the token it predicts)");
  auto model = tiny_model();
  model.depth = 0;
  REQUIRE_THROWS_AS(LongNetLM(model, causal_attention()), ConfigError);
  REQUIRE_THROWS_AS(make_lm(tiny_model(), causal_attention())(torch::zeros({2, 4}, torch::kInt)), Error);
}

TEST_CASE("next-token loss is the cross-entropy of shifted targets", "[fusion][cpu]") {
  torch::manual_seed(9);
  const at::Tensor logits = torch::randn({2, 5, 7}, torch::kDouble);
  const at::Tensor tokens = torch::randint(7, {2, 5}, torch::kLong);
  double sum = 0.0;
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t t = 0; t < 4; ++t) {
      sum -= torch::log_softmax(logits[b][t], -1)[tokens[b][t + 1].item<int64_t>()].item<double>();
    }
  }
  REQUIRE(next_token_loss(logits, tokens).item<double>() == Approx(sum / 8.0).epsilon(1e-12));
  SECTION("padded targets are left out") {
    at::Tensor mask = torch::zeros({2, 5}, torch::kBool);
    mask[1].narrow(0, 2, 3).fill_(true);  // sample 1: only target t = 1 is real
    double kept = 0.0;
    for (int64_t t = 0; t < 4; ++t) {
      kept -= torch::log_softmax(logits[0][t], -1)[tokens[0][t + 1].item<int64_t>()].item<double>();
    }
    kept -= torch::log_softmax(logits[1][0], -1)[tokens[1][1].item<int64_t>()].item<double>();
    REQUIRE(next_token_loss(logits, tokens, mask).item<double>() == Approx(kept / 5.0).epsilon(1e-12));
  }
}

TEST_CASE("every LM parameter receives a gradient", "[fusion][cpu]") {
  auto model = tiny_model();
  model.sub_layernorm = true;
  auto attention = causal_attention(attention::PositionEncoding::relative_bias);
  attention.qk_layernorm = true;
  auto lm = make_lm(model, attention);
  const at::Tensor tokens = random_tokens(2, 12, 32);
  next_token_loss(lm(tokens), tokens).backward();
  for (const auto& item : lm->named_parameters()) {
    CAPTURE(item.key());
    REQUIRE(item.value().grad().defined());
    REQUIRE(item.value().grad().abs().sum().item<double>() > 0.0);
  }
}

TEST_CASE("LM learns a repeated byte pattern with AdamW", "[fusion][cpu]") {
  ModelConfig model{.width = 32, .depth = 1, .heads = 4, .kv_heads = 4, .mlp = MlpKind::gelu, .mlp_ratio = 2.0,
                    .vocab_size = 256};
  AttentionConfig attention{
      .dilated = {.segment_lengths = {8, 16}, .dilation_rates = {1, 2}, .causal = true,
                  .backend = attention::Backend::reference},
      .position = attention::PositionEncoding::rope};
  auto lm = make_lm(model, attention, /*seed=*/0);
  // "longnet! " repeats with period 9; 'n' is followed by 'g' or 'e', so the model must use more than one token.
  const std::string pattern = "longnet! ";
  const int64_t batch = 3, n = 18;
  std::vector<at::Tensor> rows;  // sample b starts at phase 3·b of the pattern
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> bytes;
    for (int64_t i = 0; i < n; ++i) bytes.push_back(static_cast<unsigned char>(pattern[(3 * b + i) % 9]));
    rows.push_back(torch::tensor(bytes));
  }
  const at::Tensor tokens = torch::stack(rows);  // (B, N)

  torch::optim::AdamW optimizer(lm->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
  std::vector<double> losses;
  for (int step = 0; step < 30; ++step) {
    optimizer.zero_grad();
    const at::Tensor loss = next_token_loss(lm(tokens), tokens);
    loss.backward();
    optimizer.step();
    losses.push_back(loss.item<double>());
  }
  CAPTURE(losses);
  REQUIRE(losses.front() == Approx(std::log(256.0)).margin(0.5));  // near-uniform start (small tied embedding)
  for (size_t i = 1; i < losses.size(); ++i) REQUIRE(losses[i] < losses[i - 1]);
  REQUIRE(losses.back() < 0.1 * losses.front());
}
