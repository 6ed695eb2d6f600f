// The symmetric InfoNCE loss against a hand computation: both directions, rows without both modalities left out,
// learnable temperature, and the empty case.
#include <cmath>

#include <torch/torch.h>

#include "core/error.h"
#include "fusion/losses.h"

#include <catch2/catch.hpp>

using namespace longnet;

TEST_CASE("info_nce is the mean of both cross-entropies over a bᵀ / T", "[fusion][losses][cpu]") {
  const at::Tensor a = torch::tensor({{1.0, 0.0}, {0.6, 0.8}}, torch::kDouble);
  const at::Tensor b = torch::tensor({{0.8, 0.6}, {0.0, 1.0}}, torch::kDouble);
  const double t = 0.5;
  // logits = a bᵀ / t = [[1.6, 0], [1.92, 1.6]]
  const double l00 = 1.6, l01 = 0.0, l10 = 1.92, l11 = 1.6;
  const double rows = (-(l00 - std::log(std::exp(l00) + std::exp(l01))) - (l11 - std::log(std::exp(l10) + std::exp(l11)))) / 2;
  const double cols = (-(l00 - std::log(std::exp(l00) + std::exp(l10))) - (l11 - std::log(std::exp(l01) + std::exp(l11)))) / 2;
  CHECK(fusion::info_nce(a, b, t).item<double>() == Approx((rows + cols) / 2).epsilon(1e-12));
  CHECK(fusion::info_nce(b, a, t).item<double>() == Approx((rows + cols) / 2).epsilon(1e-12));  // symmetric
}

TEST_CASE("info_nce leaves out samples without both modalities", "[fusion][losses][cpu]") {
  torch::manual_seed(1);
  const at::Tensor a = torch::randn({5, 4}, torch::kDouble), b = torch::randn({5, 4}, torch::kDouble);
  const at::Tensor both = torch::tensor({true, false, true, true, false});
  const at::Tensor rows = torch::tensor({0, 2, 3}, torch::kLong);
  CHECK(fusion::info_nce(a, b, 0.07, both).item<double>() ==
        Approx(fusion::info_nce(a.index_select(0, rows), b.index_select(0, rows), 0.07).item<double>()).epsilon(1e-14));
  // No row left: zero, still part of the graph.
  const at::Tensor leaf = a.clone().requires_grad_(true);
  const at::Tensor none = fusion::info_nce(leaf, b, 0.07, torch::zeros({5}, torch::kBool));
  CHECK(none.item<double>() == 0.0);
  none.backward();
  CHECK(leaf.grad().defined());
}

TEST_CASE("info_nce: a learnable temperature gets a gradient, aligned pairs give a small loss", "[fusion][losses][cpu]") {
  torch::manual_seed(2);
  const at::Tensor a = torch::nn::functional::normalize(torch::randn({6, 8}, torch::kDouble),
                                                        torch::nn::functional::NormalizeFuncOptions().dim(1));
  const at::Tensor temperature = torch::tensor(0.5, torch::kDouble).requires_grad_(true);
  const at::Tensor loss = fusion::info_nce(a, a, temperature);
  loss.backward();
  CHECK(temperature.grad().item<double>() != 0.0);
  CHECK(fusion::info_nce(a, a, 0.01).item<double>() < 1e-3);
  CHECK(fusion::info_nce(a, a.flip(0), 0.01).item<double>() > 1.0);
  CHECK_THROWS_AS(fusion::info_nce(a, a.narrow(0, 0, 5), 0.1), Error);
  CHECK_THROWS_AS(fusion::info_nce(a, a, 0.0), Error);
}
