// Modality encoders on a CUDA device, where learned positions take one kernel (modalities/kernels/position_sum.h):
// the output and every gradient against the same encoder in float64 on the CPU, with and without bf16 autocast, and
// the float32 output against the torch ops it replaces, to the bit.
#include <iostream>
#include <string>

#include <torch/torch.h>

#include "modalities/encoders.h"
#include "tests/support/autocast.h"
#include "tests/support/oracle.h"

#include <catch2/catch.hpp>

using namespace longnet::modalities;
using longnet::test::relative_error;

namespace {

constexpr int64_t kWidth = 64, kDim = 24, kVocab = 50, kMaxPositions = 48, kB = 2, kN = 40;

ModalityEncoder make_encoder(Modality m, torch::Dtype dtype, torch::Device device) {
  torch::manual_seed(21);
  ModalityEncoder enc(EncoderOptions{.modality = m, .width = kWidth, .input_dim = m == Modality::text ? kVocab : kDim,
                                     .positional = PositionalKind::learned, .max_positions = kMaxPositions});
  enc->to(device, dtype);
  return enc;
}


}  // namespace

TEST_CASE("learned positions on CUDA match float64 on the CPU, forward and every gradient", "[modalities][gpu]") {
  REQUIRE(torch::cuda::is_available());
  const auto m = GENERATE(Modality::text, Modality::image, Modality::video, Modality::audio);
  const bool autocast = GENERATE(false, true);
  CAPTURE(to_string(m), autocast);
  auto cpu = make_encoder(m, torch::kDouble, torch::kCPU);
  auto gpu = make_encoder(m, torch::kFloat, torch::kCUDA);
  torch::manual_seed(4);
  const bool text = m == Modality::text;
  const at::Tensor x64 = text ? torch::randint(0, kVocab, {kB, kN}, torch::kLong)
                              : torch::randn({kB, kN, kDim}, torch::kDouble).requires_grad_();
  const at::Tensor positions = torch::randint(0, kMaxPositions, {kB, kN, 3}, torch::kLong);
  const at::Tensor grad = torch::randn({kB, kN, kWidth}, torch::kDouble);
  const at::Tensor want = cpu(x64, positions);
  want.backward(grad);

  const at::Tensor x = text ? x64.to(torch::kCUDA) : x64.detach().to(torch::kCUDA, torch::kFloat).requires_grad_();
  at::Tensor got;
  {
    const longnet::test::CudaAutocast guard(autocast);
    got = gpu(x, positions.to(torch::kCUDA));
  }
  got.backward(grad.to(torch::kCUDA, torch::kFloat));
  torch::cuda::synchronize();
  REQUIRE(got.scalar_type() == torch::kFloat);

  // bf16 autocast rounds the patches and the projection's weights and output once; float32 only the arithmetic.
  const double bound = autocast && !text ? 1e-2 : 1e-5;
  double worst = relative_error(got, want);
  CHECK(worst <= bound);
  if (!text) {
    const double e = relative_error(x.grad(), x64.grad());
    CHECK(e <= bound);
    worst = std::max(worst, e);
  }
  const auto want_params = cpu->named_parameters(), got_params = gpu->named_parameters();
  for (const auto& item : want_params) {
    CAPTURE(item.key());
    const at::Tensor& g = got_params[item.key()].grad();
    REQUIRE(g.defined());
    const double e = relative_error(g, item.value().grad());
    CHECK(e <= bound);
    worst = std::max(worst, e);
  }
  std::cout << "[encoder on CUDA vs float64] " << to_string(m) << " autocast=" << autocast << " worst " << worst
            << "\n";
}

TEST_CASE("the learned-position kernel gives the torch ops' float32 result to the bit", "[modalities][gpu]") {
  REQUIRE(torch::cuda::is_available());
  const auto m = GENERATE(Modality::text, Modality::video);
  CAPTURE(to_string(m));
  auto enc = make_encoder(m, torch::kFloat, torch::kCUDA);
  torch::NoGradGuard no_grad;
  torch::manual_seed(9);
  const auto cuda = torch::TensorOptions(torch::kCUDA);
  const at::Tensor positions = torch::randint(0, kMaxPositions, {kB, kN, 3}, cuda.dtype(torch::kLong));
  const auto params = enc->named_parameters();
  at::Tensor x, h, pos;
  if (m == Modality::text) {
    x = torch::randint(0, kVocab, {kB, kN}, cuda.dtype(torch::kLong));
    h = at::embedding(params["tokens.weight"], x);
    pos = at::embedding(params["position0.weight"], torch::arange(kN, cuda.dtype(torch::kLong)).expand({kB, kN}));
  } else {
    x = torch::randn({kB, kN, kDim}, cuda);
    h = at::linear(x, params["patches.weight"], params["patches.bias"]);
    pos = at::embedding(params["position0.weight"], positions.select(2, 0));
    pos = pos + at::embedding(params["position1.weight"], positions.select(2, 1));
    pos = pos + at::embedding(params["position2.weight"], positions.select(2, 2));
  }
  const at::Tensor want = h + params["modality_embedding"] + pos;
  CHECK(enc(x, positions).equal(want));
}
