// The rotary kernel behind apply_rotary and split_qkv on CUDA (RoPE and xPos), forward and gradient, against the
// float64 torch-op path on the CPU.
#include <iostream>
#include <tuple>

#include <torch/torch.h>

#include "attention/positional.h"
#include "tests/support/oracle.h"

#include <catch2/catch.hpp>

using longnet::attention::apply_rotary;
using longnet::attention::rotary_cos_sin;
using longnet::attention::split_qkv;
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

TEST_CASE("split_qkv on CUDA matches the float64 split and rotation on the CPU, forward and the packed gradient",
          "[attention][gpu]") {
  const auto dtype = GENERATE(at::kFloat, at::kBFloat16);
  const int position = GENERATE(0, 1, 2);  // none, rope, xpos
  const int64_t kv_heads = GENERATE(3, 1);  // as many as q's heads, and multi-query
  const bool drop_v = GENERATE(false, true);  // v unused: its gradient is undefined and the slot must be zero
  CAPTURE(dtype, position, kv_heads, drop_v);

  torch::manual_seed(11 + position);
  const int64_t B = 2, N = 130, H = 3, D = 64;
  const auto positions = torch::arange(7, 7 + N, torch::kLong);
  at::Tensor cos, sin, q_scale, k_scale;
  if (position > 0) std::tie(cos, sin) = rotary_cos_sin(positions, D, 10000.0);
  if (position == 2) {
    q_scale = xpos_scale(positions - N / 2, D, 512.0);
    k_scale = xpos_scale(N / 2 - positions, D, 512.0);
  }
  const auto packed = torch::randn({B, N, (H + 2 * kv_heads) * D}, torch::kDouble);
  const auto x64 = packed.detach().requires_grad_();
  const auto gq = torch::randn({B, N, H, D}, torch::kDouble), gk = torch::randn({B, N, kv_heads, D}, torch::kDouble);
  const auto gv = torch::randn({B, N, kv_heads, D}, torch::kDouble);
  const auto ref = split_qkv(x64, H, kv_heads, cos, sin, q_scale, k_scale);
  auto loss = (ref.q * gq).sum() + (ref.k * gk).sum();
  if (!drop_v) loss = loss + (ref.v * gv).sum();
  loss.backward();

  auto dev = [&](const at::Tensor& t) { return t.defined() ? t.to(torch::kCUDA) : t; };
  const auto x = packed.to(torch::kCUDA, dtype).detach().requires_grad_();
  const auto out = split_qkv(x, H, kv_heads, dev(cos), dev(sin), dev(q_scale), dev(k_scale));
  REQUIRE((out.q.is_contiguous() && out.k.is_contiguous() && out.v.is_contiguous()));
  REQUIRE(out.q.sizes() == at::IntArrayRef{B, N, H, D});
  REQUIRE(out.v.sizes() == at::IntArrayRef{B, N, kv_heads, D});
  auto device_loss = (out.q * gq.to(torch::kCUDA, dtype)).sum() + (out.k * gk.to(torch::kCUDA, dtype)).sum();
  if (!drop_v) device_loss = device_loss + (out.v * gv.to(torch::kCUDA, dtype)).sum();
  device_loss.backward();
  torch::cuda::synchronize();

  const double bound = dtype == at::kFloat ? 1e-6 : 1e-2;
  CHECK(relative_error(out.q, ref.q) <= bound);
  CHECK(relative_error(out.k, ref.k) <= bound);
  CHECK(relative_error(out.v, ref.v) <= bound);
  CHECK(relative_error(x.grad(), x64.grad()) <= bound);
  if (drop_v) CHECK((x.grad().narrow(2, (H + kv_heads) * D, kv_heads * D) == 0).all().item<bool>());
}

TEST_CASE("split_qkv on CUDA with an odd head dimension splits as on the CPU, forward and gradient",
          "[attention][gpu]") {
  torch::manual_seed(3);
  const int64_t B = 2, N = 9, H = 4, Hkv = 2, D = 3;  // D odd: no rotation is possible, the copy kernel takes pairs
  const auto packed = torch::randn({B, N, (H + 2 * Hkv) * D}, torch::kDouble);
  const auto grads = torch::randn({B, N, (H + 2 * Hkv) * D}, torch::kDouble);
  const auto x64 = packed.detach().requires_grad_();
  const auto ref = split_qkv(x64, H, Hkv);
  const auto x = packed.to(torch::kCUDA, torch::kFloat).detach().requires_grad_();
  const auto out = split_qkv(x, H, Hkv);
  REQUIRE(out.q.sizes() == at::IntArrayRef{B, N, H, D});
  CHECK(relative_error(out.q, ref.q) <= 1e-6);
  CHECK(relative_error(out.k, ref.k) <= 1e-6);
  CHECK(relative_error(out.v, ref.v) <= 1e-6);
  const auto g = grads.split_with_sizes({H * D, Hkv * D, Hkv * D}, 2);
  ((ref.q * g[0].view({B, N, H, D})).sum() + (ref.k * g[1].view({B, N, Hkv, D})).sum() +
   (ref.v * g[2].view({B, N, Hkv, D})).sum()).backward();
  ((out.q * g[0].view({B, N, H, D}).to(torch::kCUDA, torch::kFloat)).sum() +
   (out.k * g[1].view({B, N, Hkv, D}).to(torch::kCUDA, torch::kFloat)).sum() +
   (out.v * g[2].view({B, N, Hkv, D}).to(torch::kCUDA, torch::kFloat)).sum()).backward();
  CHECK(relative_error(x.grad(), x64.grad()) <= 1e-6);
}
