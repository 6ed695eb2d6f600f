// TransformerBlock in float64 on CPU: the pre-norm residual structure and both MLPs against a hand-written
// computation, widths, sub-LayerNorm, dropout, gradients and configuration errors.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include <torch/torch.h>

#include "core/error.h"
#include "fusion/block.h"
#include "fusion/gelu_mlp.h"
#include "tests/fusion/block_chain.h"
#include "tests/support/single_threaded.h"

using namespace longnet;
using namespace longnet::fusion;

namespace {

constexpr double kTol = 1e-10;

ModelConfig small_model(MlpKind mlp, bool sub_layernorm = false) {
  return ModelConfig{.width = 16, .depth = 1, .heads = 4, .kv_heads = 2, .mlp = mlp, .mlp_ratio = 2.0,
                     .sub_layernorm = sub_layernorm};
}

AttentionConfig small_attention(bool causal = true) {
  return AttentionConfig{
      .dilated = {.segment_lengths = {4, 8}, .dilation_rates = {1, 2}, .causal = causal,
                  .backend = attention::Backend::reference},
      .position = attention::PositionEncoding::rope,
      .qk_layernorm = true};
}

TransformerBlock make_block(const ModelConfig& model, const AttentionConfig& attention) {
  torch::manual_seed(11);
  TransformerBlock block(model, attention);
  block->to(torch::kDouble);
  torch::NoGradGuard no_grad;
  for (auto& p : block->parameters()) p.copy_(torch::randn_like(p) * 0.5);
  return block;
}

at::Tensor param(const TransformerBlock& block, const std::string& name) {
  return block->named_parameters()[name];
}

}  // namespace

TEST_CASE("block = x + attn(LN(x)), then + mlp(LN(·)), for GELU, tanh GELU and SwiGLU", "[fusion][cpu]") {
  const auto mlp = GENERATE(MlpKind::gelu, MlpKind::gelu_tanh, MlpKind::swiglu);
  const bool sub_layernorm = GENERATE(false, true);
  CAPTURE(to_string(mlp), sub_layernorm);
  auto block = make_block(small_model(mlp, sub_layernorm), small_attention());
  torch::manual_seed(2);
  const at::Tensor x = torch::randn({2, 10, 16}, torch::kDouble);

  const at::Tensor a = torch::layer_norm(x, {16}, param(block, "attention_norm.weight"), param(block, "attention_norm.bias"));
  const at::Tensor y = x + block->attention()(a);
  const at::Tensor m = torch::layer_norm(y, {16}, param(block, "mlp_norm.weight"), param(block, "mlp_norm.bias"));
  at::Tensor h = torch::linear(m, param(block, "fc1.weight"), param(block, "fc1.bias"));
  if (mlp == MlpKind::swiglu) {
    const int64_t hidden = 21;  // round(2/3 · 2 · 16) = round(21.33)
    REQUIRE(h.size(-1) == 2 * hidden);
    h = torch::silu(h.narrow(-1, 0, hidden)) * h.narrow(-1, hidden, hidden);
  } else {
    REQUIRE(h.size(-1) == 32);
    h = torch::gelu(h, mlp == MlpKind::gelu_tanh ? "tanh" : "none");
  }
  if (sub_layernorm) {
    h = torch::layer_norm(h, {h.size(-1)}, param(block, "mlp_sub_norm.weight"), param(block, "mlp_sub_norm.bias"));
  }
  const at::Tensor expected = y + torch::linear(h, param(block, "fc2.weight"), param(block, "fc2.bias"));
  REQUIRE(torch::allclose(block(x), expected, kTol, kTol));
  REQUIRE(block->attention()->options().sub_layernorm == sub_layernorm);
}

TEST_CASE("MLP hidden widths", "[fusion][cpu]") {
  ModelConfig model{.width = 128, .mlp = MlpKind::gelu, .mlp_ratio = 4.0};
  REQUIRE(mlp_hidden_width(model) == 512);
  model.mlp = MlpKind::swiglu;
  REQUIRE(mlp_hidden_width(model) == 341);  // round(2/3 · 512)
  model.width = 96;
  REQUIRE(mlp_hidden_width(model) == 256);
}

TEST_CASE("attention options come from ModelConfig and AttentionConfig", "[fusion][cpu]") {
  auto model = small_model(MlpKind::gelu, true);
  auto attn = small_attention(false);
  attn.position = attention::PositionEncoding::xpos;
  attn.dropout = 0.25;
  const auto options = attention_options(model, attn);
  REQUIRE(options.embed_dim == 16);
  REQUIRE(options.heads == 4);
  REQUIRE(options.kv_heads == 2);
  REQUIRE(options.sub_layernorm);
  REQUIRE(options.qk_layernorm);
  REQUIRE(options.position == attention::PositionEncoding::xpos);
  REQUIRE(options.dropout == 0.25);
  REQUIRE(options.dilated.segment_lengths == std::vector<int64_t>{4, 8});
}

TEST_CASE("block dropout acts in training mode only", "[fusion][cpu]") {
  auto model = small_model(MlpKind::gelu);
  model.dropout = 0.5;
  auto block = make_block(model, small_attention());
  const at::Tensor x = torch::randn({1, 8, 16}, torch::kDouble);
  block->eval();
  REQUIRE(torch::allclose(block(x), block(x), 0.0, 0.0));
  block->train();
  REQUIRE_FALSE(torch::allclose(block(x), block(x), 1e-6, 1e-6));
}

TEST_CASE("every block parameter receives a gradient", "[fusion][cpu]") {
  const auto mlp = GENERATE(MlpKind::gelu, MlpKind::gelu_tanh, MlpKind::swiglu);
  CAPTURE(to_string(mlp));
  auto block = make_block(small_model(mlp, /*sub_layernorm=*/true), small_attention());
  const at::Tensor x = torch::randn({2, 9, 16}, torch::kDouble);
  block(x).pow(2).sum().backward();
  for (const auto& item : block->named_parameters()) {
    CAPTURE(item.key());
    REQUIRE(item.value().grad().defined());
    REQUIRE(item.value().grad().abs().sum().item<double>() > 0.0);
  }
}

TEST_CASE("run_blocks equals calling the blocks in turn, forward and gradients", "[fusion][cpu]") {
  const auto model = small_model(MlpKind::gelu);
  std::vector<TransformerBlock> blocks;
  for (int i = 0; i < 3; ++i) {
    torch::manual_seed(20 + i);
    blocks.push_back(make_block(model, small_attention()));
  }
  const at::Tensor x0 = torch::randn({2, 9, 16}, torch::kDouble);
  const auto stream = test::chain_outputs(blocks, x0, true, false);
  const auto plain = test::chain_outputs(blocks, x0, false, false);
  REQUIRE(stream.size() == plain.size());
  for (size_t i = 0; i < stream.size(); ++i) {
    CAPTURE(i);
    REQUIRE(torch::allclose(stream[i], plain[i], 1e-12, 1e-12));
  }
  // The last block's MLP output is left to the caller.
  const Residual r = run_blocks(blocks, x0);
  REQUIRE(r.add.defined());
  REQUIRE(torch::allclose(r.value(), plain[0], 1e-12, 1e-12));
}

TEST_CASE("autocast_residual changes nothing without autocast", "[fusion][cpu]") {
  auto model = small_model(MlpKind::gelu);
  std::vector<TransformerBlock> plain, kept;
  for (int i = 0; i < 2; ++i) {
    plain.push_back(make_block(model, small_attention()));
    model.autocast_residual = true;
    kept.push_back(make_block(model, small_attention()));  // make_block seeds: the same weights
    model.autocast_residual = false;
  }
  const at::Tensor x0 = torch::randn({2, 9, 16}, torch::kDouble);
  const auto a = test::chain_outputs(plain, x0, true, false), b = test::chain_outputs(kept, x0, true, false);
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    CAPTURE(i);
    CHECK(b[i].scalar_type() == at::kDouble);
    CHECK(a[i].equal(b[i]));
  }
}

TEST_CASE("block configuration errors", "[fusion][cpu]") {
  auto model = small_model(MlpKind::gelu);
  SECTION("mlp_ratio") {
    model.mlp_ratio = 0.0;
    REQUIRE_THROWS_WITH(TransformerBlock(model, small_attention()), "model.mlp_ratio must be > 0, got 0.000000");
  }
  SECTION("dropout") {
    model.dropout = -0.1;
    REQUIRE_THROWS_AS(TransformerBlock(model, small_attention()), ConfigError);
  }
  SECTION("kv_heads from the model config") {
    model.kv_heads = 3;
    REQUIRE_THROWS_WITH(TransformerBlock(model, small_attention()),
                        "multihead dilated attention: kv_heads = 3 must divide heads = 4");
  }
}

TEST_CASE("gelu_mlp refuses CPU operands, and a CPU gelu_tanh block runs the composed MLP", "[fusion][cpu]") {
  const auto bf = torch::TensorOptions().dtype(torch::kBFloat16);
  const at::Tensor x = torch::randn({3, 16}, bf), w1 = torch::randn({32, 16}, bf), b1 = torch::randn({32}, bf),
                   w2 = torch::randn({16, 32}, bf), b2 = torch::randn({16}, bf);
  REQUIRE_FALSE(longnet::fusion::gelu_mlp_takes(x, w1, b1, w2, b2));
  REQUIRE_THROWS_AS(longnet::fusion::gelu_mlp(x, w1, b1, w2, b2), longnet::Error);

  auto block = make_block(small_model(MlpKind::gelu_tanh), small_attention());
  const at::Tensor h = torch::randn({2, 5, 16}, torch::kDouble);
  const at::Tensor want = torch::linear(
      torch::gelu(torch::linear(h, param(block, "fc1.weight"), param(block, "fc1.bias")), "tanh"),
      param(block, "fc2.weight"), param(block, "fc2.bias"));
  REQUIRE(torch::allclose(block->mlp(h), want, kTol, kTol));
}
