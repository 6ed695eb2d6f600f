// attention::linear and attention::column_sum on CUDA: the column-sum kernel against float64 sums of the same
// values, and the linear layer's output and gradients (the bias gradient from that kernel) against float64.
#include <iostream>

#include <torch/torch.h>

#include "attention/linear.h"
#include "tests/support/autocast.h"
#include "tests/support/oracle.h"

#include <catch2/catch.hpp>

using longnet::attention::column_sum;
using longnet::attention::linear;
using longnet::test::relative_error;

TEST_CASE("column_sum on CUDA: each column within one rounding of the float64 sum, deterministic",
          "[attention][gpu]") {
  const auto dtype = GENERATE(at::kBFloat16, at::kHalf);
  // (1, 8): one row; 264 columns: a partly filled block of 256; 12: not a multiple of 8 (torch's sum); the last
  // two: the shapes of a training step's projections (several chunks of rows, a ragged last chunk).
  const auto shape = GENERATE(std::vector<int64_t>{1, 8}, std::vector<int64_t>{7, 264}, std::vector<int64_t>{1000, 12},
                              std::vector<int64_t>{4099, 3072}, std::vector<int64_t>{131075, 768});
  CAPTURE(dtype, shape);
  torch::manual_seed(11);
  const auto x = torch::randn(shape, torch::TensorOptions(torch::kCUDA).dtype(dtype));
  const auto out = column_sum(x);
  const auto again = column_sum(x);
  torch::cuda::synchronize();
  REQUIRE(out.scalar_type() == dtype);
  REQUIRE(out.sizes() == torch::IntArrayRef{shape[1]});
  CHECK(torch::equal(out, again));

  const auto x64 = x.to(torch::kCPU, torch::kDouble);
  const auto ref = x64.sum(0);
  // The output is rounded once (half an ulp: 2^-9 of the value for bf16, 2^-12 for fp16); the float32 sum adds at
  // most about rows · 2^-24 of the column's absolute sum.
  const double ulp = dtype == at::kBFloat16 ? std::pow(2.0, -8) : std::pow(2.0, -11);
  const auto bound = ref.abs() * ulp + x64.abs().sum(0) * (static_cast<double>(shape[0]) * std::pow(2.0, -24)) + 1e-6;
  const auto err = (out.to(torch::kCPU, torch::kDouble) - ref).abs();
  std::cout << "[column_sum vs float64] dtype=" << dtype << " shape=" << shape[0] << "x" << shape[1]
            << " max error / bound " << (err / bound).max().item<double>() << "\n";
  CHECK((err <= bound).all().item<bool>());
}

TEST_CASE("linear on CUDA matches float64 forward and gradients, with and without autocast", "[attention][gpu]") {
  const bool autocast = GENERATE(true, false);
  const auto dtype = GENERATE(at::kBFloat16, at::kHalf);
  CAPTURE(autocast, dtype);
  torch::manual_seed(3);
  const int64_t B = 2, N = 300, in = 64, out = 96;
  const auto opts = torch::TensorOptions(torch::kCUDA).dtype(autocast ? torch::kFloat : dtype);
  const auto x = torch::randn({B, N, in}, opts).requires_grad_();
  const auto w = (torch::randn({out, in}, opts) * 0.1).detach().requires_grad_();
  const auto b = torch::randn({out}, opts).requires_grad_();
  const auto dy = torch::randn({B, N, out}, torch::TensorOptions(torch::kCUDA).dtype(dtype));
  at::Tensor y;
  {
    const longnet::test::CudaAutocast guard(autocast, dtype);
    y = linear(x, w, b);
  }
  y.backward(dy);
  torch::cuda::synchronize();
  REQUIRE(y.scalar_type() == dtype);
  REQUIRE(x.grad().scalar_type() == x.scalar_type());
  REQUIRE(b.grad().scalar_type() == b.scalar_type());

  // float64 on the operands as the GEMMs saw them (rounded to the 16-bit type).
  const auto r = [dtype](const at::Tensor& t) { return t.detach().to(dtype).to(torch::kCPU, torch::kDouble); };
  const auto x64 = r(x).reshape({B * N, in}), w64 = r(w), b64 = r(b), dy64 = r(dy).reshape({B * N, out});
  const auto y_ref = (torch::addmm(b64, x64, w64.t())).view({B, N, out});
  const double bound = dtype == at::kBFloat16 ? 1e-2 : 2e-3;
  const double e_y = relative_error(y, y_ref);
  const double e_dx = relative_error(x.grad(), dy64.mm(w64).view({B, N, in}));
  const double e_dw = relative_error(w.grad(), dy64.t().mm(x64));
  const double e_db = relative_error(b.grad(), dy64.sum(0));
  std::cout << "[linear vs float64] autocast=" << autocast << " dtype=" << dtype << " y " << e_y << " dx " << e_dx
            << " dw " << e_dw << " db " << e_db << "\n";
  CHECK(e_y <= bound);
  CHECK(e_dx <= bound);
  CHECK(e_dw <= bound);
  CHECK(e_db <= bound);
}
