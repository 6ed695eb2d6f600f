// A LongNet language model whose sequences are split across the ranks (attention::SequenceShard from
// distributed::sequence_shard) equals the same model on whole sequences in one process, in float64: the logits of each
// rank's rows, and the parameter gradients of the mean next-token loss once the ranks' shares are summed. Covers rope
// and xPos positions (counted from the part's start), grouped kv heads, activation checkpointing (the shard is
// used again in the backward) and a length not divisible by the ranks.
#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "distributed/sequence_parallel.h"
#include "fusion/longnet_lm.h"
#include "tests/distributed/world.h"
#include "tests/support/single_threaded.h"

#include <catch2/catch.hpp>

using namespace longnet;
using namespace longnet::distributed;

namespace {

double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  return (actual - expected).abs().max().item<double>() / scale;
}

struct ModelCase {
  std::string name;
  attention::PositionEncoding position = attention::PositionEncoding::rope;
  int64_t kv_heads = 4;
  bool checkpointing = false;
  int64_t n = 45;
};

void check_model(const ModelCase& c, const ProcessGroup& group) {
  INFO(c.name << ", " << group.size() << " ranks");
  const fusion::ModelConfig model_config{.width = 32, .depth = 2, .heads = 4, .kv_heads = c.kv_heads,
                                         .mlp = fusion::MlpKind::swiglu, .vocab_size = 50, .max_length = 64,
                                         .activation_checkpointing = c.checkpointing};
  const fusion::AttentionConfig attention_config{
      .dilated = {.segment_lengths = {8, 16, 64}, .dilation_rates = {1, 2, 4}, .causal = true,
                  .backend = attention::Backend::reference},
      .position = c.position,
      .xpos_scale_base = 16.0};
  torch::manual_seed(7);  // the same model and tokens on every rank
  fusion::LongNetLM whole(model_config, attention_config);
  whole->to(torch::kDouble);
  fusion::LongNetLM split(model_config, attention_config);
  split->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    const auto from = whole->parameters(), to = split->parameters();
    for (size_t i = 0; i < from.size(); ++i) to[i].copy_(from[i]);
  }
  const int64_t batch = 2;
  const auto tokens = torch::randint(0, model_config.vocab_size, {batch, c.n + 1}, torch::kLong);
  const auto inputs = tokens.narrow(1, 0, c.n), targets = tokens.narrow(1, 1, c.n);
  auto loss_sum = [](const at::Tensor& logits, const at::Tensor& t) {
    return torch::nn::functional::cross_entropy(
        logits.reshape({-1, logits.size(-1)}), t.reshape({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  };

  const auto expected_logits = whole->forward(inputs);
  (loss_sum(expected_logits, targets) / static_cast<double>(batch * c.n)).backward();

  const auto shard = sequence_shard(group, c.n);
  const SequencePart part = sequence_part(c.n, group.size(), group.rank());
  REQUIRE(shard.start == part.start);
  const auto logits = split->forward(inputs.narrow(1, part.start, part.length), std::nullopt, &shard);
  CHECK(relative_error(logits, expected_logits.narrow(1, part.start, part.length).detach()) <= 1e-10);
  (loss_sum(logits, targets.narrow(1, part.start, part.length)) / static_cast<double>(batch * c.n)).backward();
  const auto expected = whole->named_parameters();
  for (const auto& p : split->named_parameters()) {
    INFO(p.key());
    auto grad = p.value().grad().clone();
    group.all_reduce(grad);  // the ranks' shares of the same loss add up
    CHECK(relative_error(grad, expected[p.key()].grad()) <= 1e-10);
  }
}

}  // namespace

TEST_CASE("a language model split across ranks equals the whole model") {
  const auto& group = longnet::test::world().group;
  check_model({.name = "rope"}, group);
  check_model({.name = "xpos, grouped kv heads", .position = attention::PositionEncoding::xpos, .kv_heads = 2}, group);
  check_model({.name = "activation checkpointing", .checkpointing = true, .n = 64}, group);
}
