// The multimodal model in float64 on CPU, for every fusion strategy: missing-modality masking is exact (a missing
// modality equals one never given; the content of a masked modality changes nothing; mixed batches equal their samples
// run one by one, bit for bit with fusion.batch_invariant and to rounding without), absent rows are zero, the
// per-component summary adds up, and malformed inputs are DataErrors.
#include <string>

#include <torch/torch.h>

#include "core/error.h"
#include "fusion/multimodal_model.h"
#include "tests/fusion/multimodal_fixture.h"
#include "tests/support/single_threaded.h"

#include <catch2/catch.hpp>

using namespace longnet;
using namespace longnet::test;
using fusion::MultimodalOutput;

namespace {

// Every output of sample `b` of `out` against sample `ob` of `other`, bit for bit (tol 0) or to `tol`; modalities
// missing from `other` are skipped.
void check_rows(const MultimodalOutput& out, int64_t b, const MultimodalOutput& other, int64_t ob, double tol = 0) {
  auto same = [tol](const at::Tensor& x, const at::Tensor& y) {
    return tol == 0 ? torch::equal(x, y) : torch::allclose(x, y, 0.0, tol);
  };
  CHECK(same(out.joint[b], other.joint[ob]));
  for (Modality m : modalities::kAllModalities) {
    CAPTURE(modalities::to_string(m));
    if (!other.tokens[mi(m)].defined()) continue;
    CHECK(same(out.tokens[mi(m)][b], other.tokens[mi(m)][ob]));
    CHECK(same(out.embeddings[mi(m)][b], other.embeddings[mi(m)][ob]));
  }
  if (other.lm_logits.defined()) CHECK(same(out.lm_logits[b], other.lm_logits[ob]));
}

// Four presence patterns: all; no image; text + audio; video alone.
MultimodalInput mixed_batch(int64_t seed) {
  MultimodalInput in = full_batch(4, seed);
  auto p = in.present.accessor<bool, 2>();
  p[1][mi(Modality::image)] = false;
  p[2][mi(Modality::image)] = p[2][mi(Modality::video)] = false;
  p[3][mi(Modality::text)] = p[3][mi(Modality::image)] = p[3][mi(Modality::audio)] = false;
  return in;
}

}  // namespace

TEST_CASE("(a) a missing modality gives exactly the output of the input without it", "[fusion][multimodal][cpu]") {
  const std::string strategy = GENERATE(from_range(all_strategies()));
  const bool batch_invariant = GENERATE(false, true);
  const Modality missing = GENERATE(Modality::text, Modality::image, Modality::audio);
  CAPTURE(strategy, batch_invariant, modalities::to_string(missing));
  auto model = tiny_model_for(strategy, batch_invariant);
  torch::NoGradGuard no_grad;

  MultimodalInput masked = row(full_batch(2, 5), 0);
  masked.present.select(1, static_cast<int64_t>(missing)).fill_(false);
  const MultimodalOutput a = model(masked);
  const MultimodalOutput b = model(without(masked, missing));
  check_rows(a, 0, b, 0);
  CHECK(a.embeddings[mi(missing)].abs().sum().item<double>() == 0.0);
  CHECK(a.tokens[mi(missing)].abs().sum().item<double>() == 0.0);

  // Inside a mixed batch: sample 1 lacks the modality, and equals the sample run alone without it.
  MultimodalInput batch = full_batch(3, 6);
  batch.present[1][static_cast<int64_t>(missing)] = false;
  const MultimodalOutput mixed = model(batch);
  const MultimodalOutput alone = model(without(row(batch, 1), missing));
  check_rows(mixed, 1, alone, 0, batch_invariant ? 0.0 : 1e-10);
}

TEST_CASE("(b) the content of a masked modality changes nothing", "[fusion][multimodal][cpu]") {
  const std::string strategy = GENERATE(from_range(all_strategies()));
  const bool batch_invariant = GENERATE(false, true);
  CAPTURE(strategy, batch_invariant);
  auto model = tiny_model_for(strategy, batch_invariant);
  torch::NoGradGuard no_grad;

  MultimodalInput in = mixed_batch(8);
  const MultimodalOutput before = model(in);
  // Garbage in every masked row: other values, other positions, other padding, ids of other tokens.
  torch::manual_seed(99);
  auto& image = *in.modalities[mi(Modality::image)];
  image.data[1].copy_(torch::randn({6, 6}, torch::kDouble) * 100);
  image.positions[2].copy_(torch::randint(0, 8, {6, 3}, torch::kLong));
  image.padding[3].fill_(true);
  in.modalities[mi(Modality::video)]->data[2].fill_(1e30);
  in.modalities[mi(Modality::text)]->data[3].copy_(torch::randint(0, kVocab, {kTextLength}, torch::kLong));
  in.modalities[mi(Modality::audio)]->data[3].normal_();
  const MultimodalOutput after = model(in);
  for (int64_t b = 0; b < 4; ++b) {
    CAPTURE(b);
    check_rows(after, b, before, b);
  }
  // Absent rows are zero.
  CHECK(after.embeddings[mi(Modality::image)][1].abs().sum().item<double>() == 0.0);
  CHECK(after.tokens[mi(Modality::video)][2].abs().sum().item<double>() == 0.0);
  CHECK(after.lm_logits[3].abs().sum().item<double>() == 0.0);
}

TEST_CASE("(c) mixed batches equal their samples run one by one", "[fusion][multimodal][cpu]") {
  const std::string strategy = GENERATE(from_range(all_strategies()));
  const bool batch_invariant = GENERATE(false, true);
  CAPTURE(strategy, batch_invariant);
  auto model = tiny_model_for(strategy, batch_invariant);
  torch::NoGradGuard no_grad;
  const MultimodalInput in = mixed_batch(9);
  const MultimodalOutput batched = model(in);
  for (int64_t b = 0; b < 4; ++b) {
    CAPTURE(b);
    // Bit for bit with batch_invariant; otherwise GEMMs over other row counts round differently (see the header).
    check_rows(batched, b, model(row(in, b)), 0, batch_invariant ? 0.0 : 1e-10);
  }
}

TEST_CASE("parallel_stacks is a no-op on the CPU", "[fusion][multimodal][cpu]") {
  auto config = tiny_config("concat_seq");
  config.fusion.parallel_stacks = true;
  torch::manual_seed(7);
  fusion::MultimodalModel parallel(tiny_model(), tiny_attention(), config);
  parallel->to(torch::kDouble);
  auto sequential = tiny_model_for("concat_seq");
  torch::NoGradGuard no_grad;
  const MultimodalInput in = mixed_batch(3);
  check_rows(parallel(in), 2, sequential(in), 2);
}

TEST_CASE("summary: parameters per component add up, FLOPs follow the formulas", "[fusion][multimodal][cpu]") {
  const std::string strategy = GENERATE(from_range(all_strategies()));
  CAPTURE(strategy);
  auto model = tiny_model_for(strategy);
  const std::array<int64_t, 4> lengths{6, 6, 0, 7};  // no video
  const auto parts = model->summary(lengths);
  REQUIRE(parts.size() == 4 * 2 + 2);
  int64_t total = 0;
  for (const auto& p : parts) total += p.parameters;
  CHECK(total == model->num_parameters());
  CHECK(parts[0].name == "encoder.text");
  CHECK(parts[0].forward_flops == 0.0);                        // lookups
  CHECK(parts[2].name == "encoder.image");
  CHECK(parts[2].forward_flops == 2.0 * 6 * 6 * 16);            // 2·n·dim·C
  CHECK(parts[2].parameters == 6 * 16 + 16 + 16 + 8 * 16 * 2);  // patch linear, modality embedding, two tables
  CHECK(parts[5].name == "stack.video");
  CHECK(parts[5].forward_flops == 0.0);                         // absent
  CHECK(parts[8].name == "fusion." + strategy);
  CHECK(parts[8].forward_flops > 0.0);
  CHECK(parts[9].name == "heads");
  // heads: joint + text + image + audio projections (16 → 8) and the tied LM head over 6 tokens
  CHECK(parts[9].forward_flops == 2.0 * 16 * 8 * 4 + 2.0 * 6 * 16 * kVocab);
  // A stack: 2·n·(matrix parameters) + the dilated attention's products.
  const auto stack_image = parts[3];
  const auto bigger = model->summary({6, 12, 0, 7})[3];
  CHECK(bigger.forward_flops > 1.9 * stack_image.forward_flops);
}

TEST_CASE("malformed multimodal inputs are DataErrors, no enabled modality is a ConfigError", "[fusion][multimodal][cpu]") {
  auto model = tiny_model_for("concat_seq");
  torch::NoGradGuard no_grad;
  MultimodalInput in = full_batch(2, 1);
  MultimodalInput no_sample = in;
  no_sample.present = torch::zeros({2, 4}, torch::kBool);
  no_sample.present[0].fill_(true);
  CHECK_THROWS_AS(model(no_sample), DataError);  // sample 1 has nothing
  MultimodalInput flagged = without(in, Modality::video);
  flagged.present[0][mi(Modality::video)] = true;
  CHECK_THROWS_AS(model(flagged), DataError);    // present, but not given
  MultimodalInput short_batch = in;
  short_batch.modalities[mi(Modality::audio)]->data = short_batch.modalities[mi(Modality::audio)]->data.narrow(0, 0, 1);
  CHECK_THROWS_AS(model(short_batch), DataError);
  CHECK_THROWS_AS(model(MultimodalInput{}), DataError);
  MultimodalInput bad_id = in;
  bad_id.modalities[mi(Modality::text)]->data = bad_id.modalities[mi(Modality::text)]->data.clone();
  bad_id.modalities[mi(Modality::text)]->data[1][0] = -3;
  CHECK_THROWS_WITH(model->check_ranges(bad_id), Catch::Contains("text encoder: token id -3"));  // before a transfer
  CHECK_THROWS_AS(model(bad_id), DataError);                                                   // on the CPU
  CHECK_NOTHROW(model->check_ranges(in));

  auto config = tiny_config("late");
  config[Modality::video].enabled = false;
  torch::manual_seed(1);
  fusion::MultimodalModel no_video(tiny_model(), tiny_attention(), config);
  no_video->to(torch::kDouble);
  CHECK_THROWS_AS(no_video(in), DataError);       // video given to a model without it
  for (auto& m : config.modalities) m.enabled = false;
  CHECK_THROWS_AS(fusion::MultimodalModel(tiny_model(), tiny_attention(), config), ConfigError);
  config = tiny_config("no_such_strategy");
  CHECK_THROWS_AS(fusion::MultimodalModel(tiny_model(), tiny_attention(), config), ConfigError);
}

TEST_CASE("present on the host, on the inputs' device or left out gives the same outputs",
          "[fusion][multimodal][cpu]") {
  const std::string strategy = GENERATE(from_range(all_strategies()));
  const bool batch_invariant = GENERATE(false, true);
  CAPTURE(strategy, batch_invariant);
  auto model = tiny_model_for(strategy, batch_invariant);
  torch::NoGradGuard no_grad;
  auto same = [](const MultimodalOutput& a, const MultimodalOutput& b) {
    for (int64_t s = 0; s < a.joint.size(0); ++s) check_rows(a, s, b, s);
    CHECK(torch::equal(a.present, b.present));
  };

  MultimodalInput all = full_batch(3, 4);
  const MultimodalOutput given = model(all);
  CHECK(given.present.is_cpu());
  MultimodalInput left_out = all;
  left_out.present = at::Tensor();
  same(given, model(left_out));

  MultimodalInput mixed = mixed_batch(5);
  const MultimodalOutput on_host = model(mixed);
  mixed.present = mixed.present.to(mixed.modalities[mi(Modality::video)]->data.device());
  same(on_host, model(mixed));
}
