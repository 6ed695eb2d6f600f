// The rotary kernel behind apply_rotary on CUDA (RoPE and xPos), forward and gradient, against the float64 torch-op
// path on the CPU.
#include <iostream>

#include <torch/torch.h>

#include "attention/positional.h"
#include "tests/support/oracle.h"

#include <catch2/catch.hpp>

using longnet::attention::apply_rotary;
using longnet::attention::rotary_cos_sin;
using longnet::attention::xpos_scale;
using longnet::test::relative_error;

TEST_CASE("apply_rotary on CUDA matches float64 on the CPU, forward and gradient", "[attention][gpu]") {
  const auto dtype = GENERATE(at::kFloat, at::kBFloat16, at::kHalf);
  const bool xpos = GENERATE(false, true);
  const int64_t D = GENERATE(64, 6);  // 6: pairs that do not fill a 16-byte vector (the element-wise kernel)
  const bool strided = GENERATE(false, true);
  CAPTURE(dtype, xpos, D, strided);

  torch::manual_seed(5 + D);
  const int64_t B = 2, N = 300, H = 3;
  const auto positions = torch::arange(1000, 1000 + N, torch::kLong);
  const auto [cos, sin] = rotary_cos_sin(positions, D, 10000.0);
  const at::Tensor scale = xpos ? xpos_scale(positions - N / 2, D, 512.0) : at::Tensor();
  // Strided: every other head of a wider tensor, so rows are not contiguous.
  const auto base = torch::randn({B, N, strided ? 2 * H : H, D}, torch::kDouble);
  const auto x64 = (strided ? base.slice(2, 0, 2 * H, 2) : base).detach().requires_grad_();
  const auto grad = torch::randn({B, N, H, D}, torch::kDouble);
  const auto ref = apply_rotary(x64, cos, sin, scale);
  ref.backward(grad);

  const auto x_gpu = (strided ? base.to(torch::kCUDA, dtype).slice(2, 0, 2 * H, 2) : base.to(torch::kCUDA, dtype))
                         .detach()
                         .requires_grad_();
  auto dev = [](const at::Tensor& t) { return t.defined() ? t.to(torch::kCUDA) : t; };
  const auto out = apply_rotary(x_gpu, dev(cos), dev(sin), dev(scale));
  out.backward(grad.to(torch::kCUDA, dtype));
  torch::cuda::synchronize();

  REQUIRE(out.scalar_type() == dtype);
  // bf16 and fp16 round the input once and the output once; float32 only the arithmetic.
  const double bound = dtype == at::kFloat ? 1e-6 : (dtype == at::kHalf ? 2e-3 : 1e-2);
  const double e_out = relative_error(out, ref), e_grad = relative_error(x_gpu.grad(), x64.grad());
  std::cout << "[rotary kernel vs float64] dtype=" << dtype << " xpos=" << xpos << " D=" << D
            << " strided=" << strided << " out " << e_out << " grad " << e_grad << "\n";
  CHECK(e_out <= bound);
  CHECK(e_grad <= bound);
}
