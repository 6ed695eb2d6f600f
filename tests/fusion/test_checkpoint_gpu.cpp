// Activation checkpointing on a CUDA device under bf16 autocast, with dropout: the rerun in the backward pass must
// see the same autocast setting (the autograd engine's CUDA thread has none of its own) and the same CUDA dropout
// masks, so the gradients match the plain run's up to the nondeterminism of the kernels' own backward passes.
#include <map>
#include <string>

#include <torch/torch.h>

#include "fusion/longnet_lm.h"
#include "tests/support/autocast.h"

#include <catch2/catch.hpp>

using namespace longnet;
using namespace longnet::fusion;

TEST_CASE("checkpointed blocks on CUDA under bf16 autocast give the plain gradients", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  const ModelConfig model{.width = 256, .depth = 3, .heads = 4, .kv_heads = 4, .mlp = MlpKind::swiglu,
                          .mlp_ratio = 4.0, .dropout = 0.1, .vocab_size = 512, .max_length = 4096};
  const AttentionConfig attention{.dilated = {.segment_lengths = {512, 1024}, .dilation_rates = {1, 2},
                                              .causal = true},
                                  .dropout = 0.1};
  auto step = [&](bool checkpoint) {
    ModelConfig m = model;
    m.activation_checkpointing = checkpoint;
    torch::manual_seed(3);
    LongNetLM lm(m, attention);
    lm->to(torch::kCUDA);
    lm->train();
    torch::manual_seed(4);
    const auto tokens = torch::randint(0, 512, {2, 2049}, torch::TensorOptions(torch::kLong).device(torch::kCUDA));
    at::Tensor logits;
    {
      const test::CudaAutocast autocast;
      logits = lm(tokens.narrow(1, 0, 2048));
    }
    const auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, 512}).to(torch::kFloat),
                                                           tokens.narrow(1, 1, 2048).reshape({-1}));
    loss.backward();
    std::map<std::string, at::Tensor> grads;
    for (const auto& p : lm->named_parameters()) grads[p.key()] = p.value().grad().to(torch::kFloat).cpu();
    return std::pair{loss.item<double>(), grads};
  };
  const auto [plain_loss, plain] = step(false);
  const auto [ckpt_loss, ckpt] = step(true);
  CHECK(plain_loss == Approx(ckpt_loss).epsilon(1e-6));
  for (const auto& [name, g] : plain) {
    INFO(name);
    const auto& h = ckpt.at(name);
    const double scale = g.abs().max().item<double>() + 1e-12;
    CHECK((g - h).abs().max().item<double>() / scale < 2e-2);
  }
}
