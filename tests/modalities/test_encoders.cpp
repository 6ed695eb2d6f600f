// Modality encoders in float64 on CPU: output shapes, the positional encodings against their formulas (which axis
// each modality reads, learned tables summed per axis, sinusoidal channel blocks per axis), the audio patch
// normalisation, gradients, and the errors for malformed inputs.
#include <string>

#include <torch/torch.h>

#include "core/error.h"
#include "modalities/encoders.h"
#include "tests/support/single_threaded.h"

#include <catch2/catch.hpp>

using namespace longnet;
using namespace longnet::modalities;

namespace {

constexpr int64_t kWidth = 12;

ModalityEncoder make_encoder(Modality m, PositionalKind kind, int64_t input_dim = 6, int64_t max_positions = 8) {
  torch::manual_seed(3);
  ModalityEncoder enc(EncoderOptions{.modality = m, .width = kWidth, .input_dim = input_dim, .positional = kind,
                                     .max_positions = max_positions});
  enc->to(torch::kDouble);
  return enc;
}

// Patches (B, N, dim) and (t, y, x) positions with every coordinate in [0, 4).
std::pair<at::Tensor, at::Tensor> patches(int64_t b, int64_t n, int64_t dim, int64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({b, n, dim}, torch::kDouble), torch::randint(0, 4, {b, n, 3}, torch::kLong)};
}

// Zeroes the patch (or token) embedding so that the output is modality embedding + positions alone.
void zero_content(ModalityEncoder& enc) {
  torch::NoGradGuard no_grad;
  for (auto& item : enc->named_parameters()) {
    const std::string& name = item.key();
    if (name.rfind("patches.", 0) == 0 || name.rfind("tokens.", 0) == 0) item.value().zero_();
  }
}

}  // namespace

TEST_CASE("sinusoidal_encoding interleaves sin and cos at geometric frequencies", "[modalities][cpu]") {
  const at::Tensor pe = sinusoidal_encoding(torch::tensor({3}, torch::kLong), 4);
  // dim 4: frequencies 1 and 10000^(-2/4) = 0.01
  const at::Tensor expected = torch::tensor({std::sin(3.0), std::cos(3.0), std::sin(0.03), std::cos(0.03)},
                                            torch::kDouble).view({1, 4});
  CHECK(pe.sizes() == at::IntArrayRef({1, 4}));
  CHECK(torch::allclose(pe, expected, 0.0, 1e-15));
  // odd widths end with a sine
  CHECK(sinusoidal_encoding(torch::tensor({2.0}), 3).sizes() == at::IntArrayRef({1, 3}));
}

TEST_CASE("every modality encodes to (B, N, C) and all parameters get gradients", "[modalities][cpu]") {
  const Modality m = GENERATE(Modality::text, Modality::image, Modality::video, Modality::audio);
  const PositionalKind kind = GENERATE(PositionalKind::learned, PositionalKind::sinusoidal);
  CAPTURE(to_string(m), to_string(kind));
  auto enc = make_encoder(m, kind, m == Modality::text ? 10 : 6);
  at::Tensor out;
  if (m == Modality::text) {
    out = enc(torch::randint(0, 10, {2, 5}, torch::kLong));
    CHECK(out.sizes() == at::IntArrayRef({2, 5, kWidth}));
  } else {
    auto [values, positions] = patches(2, 7, 6, 1);
    out = enc(values, positions);
    CHECK(out.sizes() == at::IntArrayRef({2, 7, kWidth}));
  }
  CHECK(out.scalar_type() == torch::kDouble);
  (out * torch::randn_like(out)).sum().backward();
  for (const auto& item : enc->named_parameters()) {
    const std::string& name = item.key();
    const at::Tensor& p = item.value();
    CAPTURE(name);
    REQUIRE(p.grad().defined());
    CHECK(torch::isfinite(p.grad()).all().item<bool>());
    CHECK(p.grad().abs().sum().item<double>() > 0);
  }
  // A learned table per position axis; none with sinusoidal positions.
  int64_t tables = 0;
  for (const auto& item : enc->named_parameters()) tables += item.key().rfind("position", 0) == 0 ? 1 : 0;
  CHECK(tables == (kind == PositionalKind::learned ? position_axes(m) : 0));
}

TEST_CASE("learned positions: the sum of one table row per axis the modality reads", "[modalities][cpu]") {
  const Modality m = GENERATE(Modality::image, Modality::video, Modality::audio);
  CAPTURE(to_string(m));
  auto enc = make_encoder(m, PositionalKind::learned);
  zero_content(enc);
  auto [values, positions] = patches(2, 5, 6, 2);
  const at::Tensor out = enc(values, positions);
  auto params = enc->named_parameters();
  at::Tensor expected = params["modality_embedding"].expand({2, 5, kWidth}).clone();
  // image reads (y, x) = columns 1, 2; video (t, y, x); audio t
  const std::vector<int64_t> columns = m == Modality::image ? std::vector<int64_t>{1, 2}
                                       : m == Modality::video ? std::vector<int64_t>{0, 1, 2}
                                                              : std::vector<int64_t>{0};
  for (size_t a = 0; a < columns.size(); ++a) {
    expected = expected + params["position" + std::to_string(a) + ".weight"].index({positions.select(2, columns[a])});
  }
  CHECK(torch::equal(out, expected));
}

TEST_CASE("sinusoidal positions: one channel block per axis, the first taking the remainder", "[modalities][cpu]") {
  auto enc = make_encoder(Modality::video, PositionalKind::sinusoidal);
  zero_content(enc);
  auto [values, positions] = patches(1, 6, 6, 4);
  const at::Tensor pos = enc(values, positions) - enc->named_parameters()["modality_embedding"];
  // C = 12 over 3 axes: 4 channels each for t, y, x
  for (int64_t a = 0; a < 3; ++a) {
    CAPTURE(a);
    CHECK(torch::allclose(pos.narrow(2, 4 * a, 4), sinusoidal_encoding(positions.select(2, a), 4), 0.0, 1e-15));
  }
  auto image = make_encoder(Modality::image, PositionalKind::sinusoidal);
  zero_content(image);
  const at::Tensor ipos = image(values, positions) - image->named_parameters()["modality_embedding"];
  CHECK(torch::allclose(ipos.narrow(2, 0, 6), sinusoidal_encoding(positions.select(2, 1), 6), 0.0, 1e-15));
  CHECK(torch::allclose(ipos.narrow(2, 6, 6), sinusoidal_encoding(positions.select(2, 2), 6), 0.0, 1e-15));
}

TEST_CASE("each modality ignores the position axes it does not have", "[modalities][cpu]") {
  const PositionalKind kind = GENERATE(PositionalKind::learned, PositionalKind::sinusoidal);
  auto [values, positions] = patches(2, 5, 6, 5);
  at::Tensor other_t = positions.clone(), other_yx = positions.clone();
  other_t.select(2, 0).add_(1).remainder_(4);
  other_yx.narrow(2, 1, 2).add_(1).remainder_(4);
  auto image = make_encoder(Modality::image, kind);
  auto video = make_encoder(Modality::video, kind);
  auto audio = make_encoder(Modality::audio, kind);
  CHECK(torch::equal(image(values, positions), image(values, other_t)));     // images: t = 0 by convention
  CHECK_FALSE(torch::equal(image(values, positions), image(values, other_yx)));
  CHECK(torch::equal(audio(values, positions), audio(values, other_yx)));    // audio: (t, 0, 0)
  CHECK_FALSE(torch::equal(audio(values, positions), audio(values, other_t)));
  CHECK_FALSE(torch::equal(video(values, positions), video(values, other_t)));
  CHECK_FALSE(torch::equal(video(values, positions), video(values, other_yx)));
}

TEST_CASE("text: token row + modality embedding + position row", "[modalities][cpu]") {
  auto enc = make_encoder(Modality::text, PositionalKind::learned, 10);
  const at::Tensor ids = torch::tensor({3, 3, 9}, torch::kLong).view({1, 3});
  const at::Tensor out = enc(ids);
  auto p = enc->named_parameters();
  const at::Tensor expected = p["tokens.weight"].index({ids}) + p["modality_embedding"] +
                              p["position0.weight"].narrow(0, 0, 3).unsqueeze(0);
  CHECK(torch::equal(out, expected));
  CHECK_FALSE(torch::equal(out[0][0], out[0][1]));  // same token, different positions
  CHECK(enc->embedding_weight().sizes() == at::IntArrayRef({10, kWidth}));
}

TEST_CASE("audio patches are normalised: a log-mel level offset and gain change nothing", "[modalities][cpu]") {
  auto enc = make_encoder(Modality::audio, PositionalKind::sinusoidal);
  auto [values, positions] = patches(2, 4, 6, 6);
  // up to LayerNorm's eps = 1e-5 in the variance
  CHECK(torch::allclose(enc(values, positions), enc(values * 3.0 - 20.0, positions), 0.0, 1e-4));
  auto image = make_encoder(Modality::image, PositionalKind::sinusoidal);
  CHECK_FALSE(torch::allclose(image(values, positions), image(values * 3.0 - 20.0, positions), 0.0, 1e-2));
}

TEST_CASE("encoders reject malformed inputs with DataError and bad options with ConfigError", "[modalities][cpu]") {
  auto text = make_encoder(Modality::text, PositionalKind::learned, 10, 4);
  CHECK_THROWS_AS(text(torch::tensor({{1, 10}}, torch::kLong)), DataError);          // id outside the vocabulary
  CHECK_THROWS_AS(text(torch::tensor({{1, -1}}, torch::kLong)), DataError);
  CHECK_THROWS_AS(text(torch::zeros({1, 5}, torch::kLong)), DataError);              // longer than max_positions
  CHECK_THROWS_AS(text(torch::zeros({1, 2}, torch::kDouble)), DataError);            // not ids
  auto image = make_encoder(Modality::image, PositionalKind::learned, 6, 4);
  auto [values, positions] = patches(1, 3, 6, 7);
  CHECK_THROWS_AS(image(values, at::Tensor()), DataError);                           // positions missing
  CHECK_THROWS_AS(image(values.narrow(2, 0, 5), positions), DataError);              // wrong patch dim
  CHECK_THROWS_AS(image(values, positions.narrow(2, 0, 2)), DataError);              // not (t, y, x)
  positions[0][1][2] = 4;
  try {
    image(values, positions);
    FAIL("no DataError");
  } catch (const DataError& e) {
    CHECK(std::string(e.what()) == "image encoder: position 4 outside [0, 4) (max_positions)");
  }
  CHECK_THROWS_WITH(image->check_ranges(values, positions), "image encoder: position 4 outside [0, 4) (max_positions)");
  positions[0][1][2] = 3;
  CHECK_NOTHROW(image->check_ranges(values, positions));
  CHECK_THROWS_WITH(text->check_ranges(torch::tensor({{1, 10}}, torch::kLong)),
                    "text encoder: token id 10 outside the vocabulary [0, 10)");
  CHECK_NOTHROW(text->check_ranges(torch::tensor({{0, 9}}, torch::kLong)));
  CHECK_THROWS_AS(ModalityEncoder(EncoderOptions{.modality = Modality::video, .width = 0}), ConfigError);
  CHECK_THROWS_AS(parse_positional_kind("rotary"), ConfigError);
  CHECK(parse_modality("audio") == Modality::audio);
  CHECK_FALSE(parse_modality("smell").has_value());
}
