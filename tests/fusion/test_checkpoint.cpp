// Activation checkpointing: a checkpointed function and checkpointed blocks give the gradients of the plain
// computation to the last bit (float64, CPU), dropout included, and leave the random generator where the plain run
// leaves it.
#include <string>
#include <vector>

#include <torch/torch.h>

#include "fusion/block.h"
#include "fusion/checkpoint.h"
#include "fusion/longnet_lm.h"
#include "tests/fusion/multimodal_fixture.h"
#include "tests/support/single_threaded.h"

#include <catch2/catch.hpp>

using namespace longnet;
using namespace longnet::fusion;

namespace {

ModelConfig model_config(bool checkpoint) {
  return ModelConfig{.width = 16, .depth = 3, .heads = 4, .kv_heads = 2, .mlp = MlpKind::swiglu, .mlp_ratio = 2.0,
                     .dropout = 0.2, .vocab_size = 32, .max_length = 64, .activation_checkpointing = checkpoint};
}

AttentionConfig attention_config() {
  return AttentionConfig{.dilated = {.segment_lengths = {8, 16}, .dilation_rates = {1, 2}, .causal = true,
                                     .backend = attention::Backend::reference},
                         .dropout = 0.1};
}

// Gradients by parameter name after one backward pass of `loss`.
std::map<std::string, at::Tensor> grads(torch::nn::Module& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m.named_parameters()) {
    out[p.key()] = p.value().grad().defined() ? p.value().grad().clone() : at::Tensor();
  }
  return out;
}

}  // namespace

TEST_CASE("checkpointed() gives the plain gradients, reruns dropout with the same mask, and keeps the generator",
          "[fusion][cpu]") {
  torch::manual_seed(3);
  const auto w = torch::randn({8, 8}, torch::kDouble).requires_grad_(true);
  const auto x0 = torch::randn({5, 8}, torch::kDouble);
  auto fn = [&](const at::Tensor& h) { return at::dropout(torch::tanh(h.matmul(w)), 0.5, true).matmul(w); };

  auto run = [&](bool checkpoint) {
    w.mutable_grad() = at::Tensor();
    const auto x = x0.clone().requires_grad_(true);
    torch::manual_seed(7);
    const auto y = checkpoint ? checkpointed(fn, x) : fn(x);
    y.pow(2).sum().backward();
    const auto after = torch::rand({1}, torch::kDouble);  // where the generator stands after the step
    return std::vector<at::Tensor>{y.detach(), x.grad(), w.grad().clone(), after};
  };
  const auto plain = run(false), ckpt = run(true);
  for (size_t i = 0; i < plain.size(); ++i) {
    INFO("tensor " << i);
    CHECK(torch::equal(plain[i], ckpt[i]));
  }
  // The checkpointed output carries the rerun's backward; no grad mode or an input without gradient just runs fn.
  CHECK(checkpointed(fn, x0.clone().requires_grad_(true)).grad_fn()->name() == "CheckpointBackward");
  CHECK_FALSE(checkpointed(fn, x0).grad_fn() == nullptr);  // w still needs a gradient through the plain graph
  {
    torch::NoGradGuard no_grad;
    CHECK_FALSE(checkpointed(fn, x0.clone().requires_grad_(true)).requires_grad());
  }
}

TEST_CASE("a LongNet LM with activation checkpointing trains exactly like one without", "[fusion][cpu]") {
  auto step = [](bool checkpoint) {
    torch::manual_seed(11);
    LongNetLM lm(model_config(checkpoint), attention_config());
    lm->to(torch::kDouble);
    lm->train();
    torch::manual_seed(5);
    const auto tokens = torch::randint(0, 32, {2, 40}, torch::kLong);
    const auto logits = lm(tokens.narrow(1, 0, 39));
    const auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, 32}),
                                                           tokens.narrow(1, 1, 39).reshape({-1}));
    loss.backward();
    return std::pair{loss.item<double>(), grads(*lm)};
  };
  const auto [plain_loss, plain] = step(false);
  const auto [ckpt_loss, ckpt] = step(true);
  CHECK(plain_loss == ckpt_loss);
  REQUIRE(plain.size() == ckpt.size());
  for (const auto& [name, g] : plain) {
    INFO(name);
    REQUIRE(ckpt.count(name) == 1);
    CHECK(torch::equal(g, ckpt.at(name)));
  }
}

TEST_CASE("every fusion strategy and stack with activation checkpointing gives the plain gradients", "[fusion][cpu]") {
  for (const std::string& strategy : test::all_strategies()) {
    INFO(strategy);
    auto step = [&](bool checkpoint) {
      auto model = test::tiny_model();
      model.dropout = 0.1;
      model.activation_checkpointing = checkpoint;
      torch::manual_seed(7);
      MultimodalModel m(model, test::tiny_attention(), test::tiny_config(strategy));
      m->to(torch::kDouble);
      m->train();
      const auto in = test::full_batch(3, 5);
      torch::manual_seed(9);
      const auto out = m(in);
      const auto loss = out.joint.pow(3).sum() + out.lm_logits.pow(2).mean();
      loss.backward();
      return std::pair{loss.item<double>(), grads(*m)};
    };
    const auto [plain_loss, plain] = step(false);
    const auto [ckpt_loss, ckpt] = step(true);
    CHECK(plain_loss == ckpt_loss);
    for (const auto& [name, g] : plain) {
      INFO(name);
      REQUIRE(ckpt.count(name) == 1);
      if (!g.defined()) {
        CHECK_FALSE(ckpt.at(name).defined());
        continue;
      }
      CHECK(torch::equal(g, ckpt.at(name)));
    }
  }
}
