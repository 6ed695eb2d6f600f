// The fusion strategies through the multimodal model: output shapes and norms, gradient flow to every parameter (and
// none to the absent rows' inputs), the registry, and a few training steps on a synthetic task per strategy with a
// falling loss (InfoNCE between image and text + the LM loss + InfoNCE between the joint and the audio embedding).
#include <string>

#include <torch/torch.h>

#include "core/device_copy.h"
#include "core/error.h"
#include "fusion/longnet_lm.h"
#include "fusion/losses.h"
#include "fusion/multimodal_model.h"
#include "fusion/strategies.h"
#include "tests/fusion/multimodal_fixture.h"
#include "tests/support/single_threaded.h"

#include <catch2/catch.hpp>

using namespace longnet;
using namespace longnet::test;
using fusion::MultimodalOutput;


TEST_CASE("the registry lists the five strategies and builds each by name", "[fusion][strategies][cpu]") {
  CHECK(fusion::registered_strategies() == all_strategies());
  fusion::StrategyContext ctx{.model = tiny_model(), .attention = tiny_attention(), .fusion = tiny_config("late").fusion};
  ctx.enabled = {true, true, false, false};
  for (const auto& name : all_strategies()) {
    ctx.fusion.strategy = name;
    CHECK(fusion::make_strategy(ctx) != nullptr);
  }
  ctx.fusion.strategy = "average";
  CHECK_THROWS_AS(fusion::make_strategy(ctx), ConfigError);
  // A strategy registered from outside is built like the built-in ones.
  fusion::register_strategy("late_copy", [](const fusion::StrategyContext& c) {
    fusion::StrategyContext copy = c;
    copy.fusion.strategy = "late";
    return fusion::make_strategy(copy);
  });
  ctx.fusion.strategy = "late_copy";
  CHECK(fusion::make_strategy(ctx) != nullptr);
  CHECK(fusion::registered_strategies().back() == "late_copy");
}

TEST_CASE("every strategy: shapes, unit embeddings, zero rows for absent modalities", "[fusion][strategies][cpu]") {
  const std::string strategy = GENERATE(from_range(all_strategies()));
  CAPTURE(strategy);
  auto model = tiny_model_for(strategy);
  torch::NoGradGuard no_grad;
  MultimodalInput in = full_batch(3, 2);
  in.present[1][mi(Modality::image)] = false;
  const MultimodalOutput out = model(in);
  CHECK(out.joint.sizes() == at::IntArrayRef({3, 8}));
  CHECK(torch::allclose(out.joint.norm(2, 1), torch::ones({3}, torch::kDouble), 0.0, 1e-12));
  CHECK(out.tokens[mi(Modality::video)].sizes() == at::IntArrayRef({3, 8, 16}));
  CHECK(out.lm_logits.sizes() == at::IntArrayRef({3, kTextLength, kVocab}));
  const at::Tensor norms = out.embeddings[mi(Modality::image)].norm(2, 1);
  CHECK(norms[0].item<double>() == Approx(1.0).epsilon(1e-12));
  CHECK(norms[1].item<double>() == 0.0);
  CHECK(torch::isfinite(out.joint).all().item<bool>());
}

TEST_CASE("every strategy: every parameter gets a finite non-zero gradient", "[fusion][strategies][cpu]") {
  const std::string strategy = GENERATE(from_range(all_strategies()));
  CAPTURE(strategy);
  auto model = tiny_model_for(strategy);
  model->train();
  MultimodalInput in = full_batch(3, 4);
  in.present[1][mi(Modality::image)] = false;
  in.present[2][mi(Modality::text)] = false;
  auto& image = *in.modalities[mi(Modality::image)];
  image.data.requires_grad_(true);
  const MultimodalOutput out = model(in);
  torch::manual_seed(5);
  at::Tensor loss = (out.joint * torch::randn_like(out.joint)).sum() +
                    (out.lm_logits * torch::randn_like(out.lm_logits)).sum();
  for (const auto& e : out.embeddings) loss = loss + (e * torch::randn_like(e)).sum();
  loss.backward();
  for (const auto& item : model->named_parameters()) {
    CAPTURE(item.key());
    REQUIRE(item.value().grad().defined());
    CHECK(torch::isfinite(item.value().grad()).all().item<bool>());
    CHECK(item.value().grad().abs().sum().item<double>() > 0.0);
  }
  // The absent sample's image never took part: its input gets exactly zero gradient.
  CHECK(image.data.grad()[1].abs().sum().item<double>() == 0.0);
  CHECK(image.data.grad()[0].abs().sum().item<double>() > 0.0);
}

TEST_CASE("every strategy trains: the loss falls on a synthetic correlated task", "[fusion][strategies][cpu]") {
  const std::string strategy = GENERATE(from_range(all_strategies()));
  CAPTURE(strategy);
  auto model = tiny_model_for(strategy, false, torch::kFloat);
  model->train();
  // Eight samples, one class each: the class sets the text (a repeated two-token pattern), an image prototype and an
  // audio prototype, each with noise. Samples 6 and 7 lack audio, sample 5 lacks the image.
  MultimodalInput in = full_batch(8, 12, torch::kFloat);
  torch::manual_seed(13);
  const at::Tensor cls = torch::arange(8, torch::kLong);
  in.modalities[mi(Modality::text)]->data =
      torch::stack({cls, (cls + 3) % kVocab}, 1).repeat({1, kTextLength / 2});
  const at::Tensor image_proto = torch::randn({8, 1, 6});
  in.modalities[mi(Modality::image)]->data = image_proto + 0.1 * torch::randn({8, 6, 6});
  const at::Tensor audio_proto = torch::randn({8, 1, 4});
  in.modalities[mi(Modality::audio)]->data = audio_proto * torch::linspace(1, 2, 7).view({1, 7, 1}) +
                                             0.1 * torch::randn({8, 7, 4});
  in.modalities[mi(Modality::video)]->data = torch::randn({8, 8, 5});
  in.present.narrow(0, 6, 2).select(1, static_cast<int64_t>(mi(Modality::audio))).fill_(false);
  in.present[5][mi(Modality::image)] = false;

  torch::optim::Adam optimiser(model->parameters(), torch::optim::AdamOptions(3e-3));
  std::vector<double> losses;
  for (int step = 0; step < 40; ++step) {
    const MultimodalOutput out = model(in);
    const at::Tensor both = in.present.select(1, 0) & in.present.select(1, 1);
    const at::Tensor with_audio = in.present.select(1, static_cast<int64_t>(mi(Modality::audio)));
    const at::Tensor loss =
        fusion::info_nce(out.embeddings[mi(Modality::image)], out.embeddings[mi(Modality::text)], 0.1, both) +
        fusion::next_token_loss(out.lm_logits, in.modalities[mi(Modality::text)]->data) +
        fusion::info_nce(out.joint, out.embeddings[mi(Modality::audio)], 0.1, with_audio);
    optimiser.zero_grad();
    loss.backward();
    optimiser.step();
    losses.push_back(loss.item<double>());
  }
  CAPTURE(losses);
  const double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[37] + losses[38] + losses[39]) / 3;
  CHECK(std::isfinite(last));
  CHECK(last < 0.5 * first);
}

TEST_CASE("presence_groups: one group per set of present modalities, in mask order", "[fusion][strategies][cpu]") {
  const at::Tensor present = torch::tensor({1, 1, 0, 0,  //
                                            0, 1, 0, 1,  //
                                            1, 1, 0, 0,  //
                                            0, 0, 1, 0}, torch::kBool).view({4, 4});
  const auto groups = fusion::presence_groups(present, torch::kCPU);
  REQUIRE(groups.size() == 3);
  CHECK(groups[0].first == 0b0011U);
  CHECK(torch::equal(groups[0].second, torch::tensor({0, 2}, torch::kLong)));
  CHECK(groups[1].first == 0b0100U);
  CHECK(torch::equal(groups[1].second, torch::tensor({3}, torch::kLong)));
  CHECK(groups[2].first == 0b1010U);
  CHECK(torch::equal(groups[2].second, torch::tensor({1}, torch::kLong)));
  CHECK_THROWS_AS(fusion::presence_groups(torch::zeros({1, 4}, torch::kBool), torch::kCPU), DataError);
  // A host target needs no copy.
  CHECK(longnet::to_device_async(present, torch::kCPU).is_same(present));
}
