// The reference backend on a CUDA device: the same function as on the CPU, checked against the float64 oracle.
#include <iostream>

#include <torch/torch.h>

#include "attention/reference.h"
#include "tests/support/oracle.h"

#include <catch2/catch.hpp>

using longnet::attention::AttentionOptions;
using longnet::attention::DilatedAttentionConfig;
using longnet::attention::reference_dilated_attention;
using longnet::test::oracle_dilated_attention;
using longnet::test::relative_error;

TEST_CASE("reference backend on CUDA matches the float64 oracle", "[attention][gpu]") {
  const auto dtype = GENERATE(at::kDouble, at::kFloat);
  const bool causal = GENERATE(false, true);
  const int64_t n = GENERATE(64, 100);
  const bool padded = GENERATE(false, true);
  CAPTURE(dtype, causal, n, padded);

  torch::manual_seed(17 + n);
  DilatedAttentionConfig config;
  config.segment_lengths = {16, 32, 64};
  config.dilation_rates = {1, 2, 4};
  config.causal = causal;
  const int64_t B = 2, H = 6, D = 16;
  const auto cpu = torch::TensorOptions().dtype(at::kDouble);
  const auto q64 = torch::randn({B, n, H, D}, cpu).requires_grad_();
  const auto k64 = torch::randn({B, n, H, D}, cpu).requires_grad_();
  const auto v64 = torch::randn({B, n, H, D}, cpu).requires_grad_();
  const auto dout = torch::randn({B, n, H, D}, cpu);
  AttentionOptions cpu_options, gpu_options;
  if (padded) {
    auto mask = torch::zeros({B, n}, torch::kBool);
    mask.narrow(1, n - 7, 7).fill_(true);
    cpu_options.key_padding_mask = mask;
    gpu_options.key_padding_mask = mask.cuda();
  }
  const auto oracle = oracle_dilated_attention(q64, k64, v64, config, cpu_options);
  oracle.out.backward(dout);

  auto on_gpu = [&](const at::Tensor& x) { return x.detach().to(torch::kCUDA, dtype).requires_grad_(); };
  const auto q = on_gpu(q64), k = on_gpu(k64), v = on_gpu(v64);
  const auto ref = reference_dilated_attention(q, k, v, config, gpu_options);
  ref.out.backward(dout.to(torch::kCUDA, dtype));
  torch::cuda::synchronize();

  const double bound = dtype == at::kDouble ? 1e-10 : 1e-4;
  const double e_out = relative_error(ref.out, oracle.out), e_lse = relative_error(ref.lse, oracle.lse);
  const double e_dq = relative_error(q.grad(), q64.grad()), e_dk = relative_error(k.grad(), k64.grad());
  const double e_dv = relative_error(v.grad(), v64.grad());
  std::cout << "[reference on cuda vs oracle] dtype=" << dtype << " causal=" << causal << " n=" << n
            << " padded=" << padded << " out " << e_out << " lse " << e_lse << " dq " << e_dq << " dk " << e_dk
            << " dv " << e_dv << "\n";
  CHECK(e_out <= bound);
  CHECK(e_lse <= bound);
  CHECK(e_dq <= bound);
  CHECK(e_dk <= bound);
  CHECK(e_dv <= bound);
}
