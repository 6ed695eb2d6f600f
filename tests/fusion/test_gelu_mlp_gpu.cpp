// fusion/gelu_mlp.h on a CUDA device: each cuBLASLt epilogue against torch operators in float32; the epilogue-GEMM MLP
// against float64 fc2(gelu_tanh(fc1(x))) on the CPU, forward and every gradient; and a gelu_tanh block under autocast
// (which takes that path) against the same block whose MLP is composed of torch operators.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include <torch/torch.h>

#include <ATen/cuda/CUDAContext.h>

#include "fusion/block.h"
#include "fusion/gelu_mlp.h"
#include "fusion/kernels/gemm_epilogue.h"
#include "tests/support/autocast.h"

#include <catch2/catch.hpp>

namespace {

double relative_error(const at::Tensor& got, const at::Tensor& want) {
  const auto g = got.detach().cpu().to(at::kDouble), w = want.detach().cpu().to(at::kDouble);
  return ((g - w).norm() / w.norm().clamp_min(1e-30)).item<double>();
}


}  // namespace

TEST_CASE("launch_gemm_epilogue: each epilogue against torch operators", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  using longnet::fusion::kernels::GemmEpilogue;
  const int64_t rows = 300, c = 64, hidden = 256;
  torch::manual_seed(3);
  const auto bf = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  const auto x = torch::randn({rows, c}, bf), dy = torch::randn({rows, c}, bf), b1 = torch::randn({hidden}, bf);
  const auto w1 = torch::randn({hidden, c}, bf) * 0.125, w2 = torch::randn({c, hidden}, bf) * 0.0625;
  const auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
  const auto params = [](GemmEpilogue e) {
    longnet::fusion::kernels::GemmEpilogueParams p;
    p.handle = at::cuda::getCurrentCUDABlasLtHandle();
    p.workspace = at::cuda::getCUDABlasLtWorkspace();
    p.workspace_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
    p.stream = at::cuda::getCurrentCUDAStream().stream();
    p.epilogue = e;
    return p;
  };

  // bias_gelu_aux: (rows, hidden) = gelu(x·W1ᵀ + b1), aux the pre-activation.
  auto pre = at::empty({rows, hidden}, bf), act = at::empty({rows, hidden}, bf);
  auto p = params(GemmEpilogue::bias_gelu_aux);
  p.transpose_a = true, p.m = hidden, p.n = rows, p.k = c, p.a = w1.data_ptr(), p.lda = c, p.b = x.data_ptr();
  p.ldb = c, p.d = act.data_ptr(), p.ldd = hidden, p.aux = pre.data_ptr(), p.bias = b1.data_ptr();
  longnet::fusion::kernels::launch_gemm_epilogue(p);
  const auto pre_want = at::addmm(f(b1), f(x), f(w1).t());
  CHECK(relative_error(pre, pre_want) < 1e-2);
  CHECK(relative_error(act, at::gelu(pre_want, "tanh")) < 1e-2);

  // dgelu and dgelu_bgrad: (dy·W2) ⊙ gelu'(pre), and its column sums.
  const auto dpre_want = at::gelu_backward(at::mm(f(dy), f(w2)), f(pre), "tanh");
  for (const GemmEpilogue e : {GemmEpilogue::dgelu, GemmEpilogue::dgelu_bgrad}) {
    INFO("dgelu_bgrad " << (e == GemmEpilogue::dgelu_bgrad));
    auto dpre = at::empty({rows, hidden}, bf), db1 = at::zeros({hidden}, bf);
    p = params(e);
    p.m = hidden, p.n = rows, p.k = c, p.a = w2.data_ptr(), p.lda = hidden, p.b = dy.data_ptr(), p.ldb = c;
    p.d = dpre.data_ptr(), p.ldd = hidden, p.aux = pre.data_ptr(), p.bias = db1.data_ptr();
    longnet::fusion::kernels::launch_gemm_epilogue(p);
    CHECK(relative_error(dpre, dpre_want) < 1e-2);
    if (e == GemmEpilogue::dgelu_bgrad) CHECK(relative_error(db1, dpre_want.sum(0)) < 1e-2);
  }

  // bgradb: dW2 = dyᵀ·act (c, hidden) and db2 = the column sums of dy.
  auto dw2 = at::empty({c, hidden}, bf), db2 = at::empty({c}, bf);
  p = params(GemmEpilogue::bgradb);
  p.transpose_b = true, p.m = hidden, p.n = c, p.k = rows, p.a = act.data_ptr(), p.lda = hidden, p.b = dy.data_ptr();
  p.ldb = c, p.d = dw2.data_ptr(), p.ldd = hidden, p.bias = db2.data_ptr();
  longnet::fusion::kernels::launch_gemm_epilogue(p);
  CHECK(relative_error(dw2, at::mm(f(dy).t(), f(act))) < 1e-2);
  CHECK(relative_error(db2, f(dy).sum(0)) < 1e-2);

  // Bad parameters are refused before cuBLASLt sees them.
  p.ldd = hidden - 1;
  CHECK_THROWS_AS(longnet::fusion::kernels::launch_gemm_epilogue(p), std::invalid_argument);
  p.ldd = hidden, p.transpose_b = false;
  CHECK_THROWS_AS(longnet::fusion::kernels::launch_gemm_epilogue(p), std::invalid_argument);
}

TEST_CASE("gelu_mlp matches float64 fc2(gelu_tanh(fc1(x))), forward and gradients", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  struct Case {
    std::vector<int64_t> shape;  // x
    int64_t hidden;
    at::ScalarType dtype;
  };
  // The model's widths (768 → 3072), a batched input with an odd row count, one row, and float16.
  const std::vector<Case> cases = {{{2, 300, 768}, 3072, at::kBFloat16},
                                   {{3, 1001, 256}, 1024, at::kBFloat16},
                                   {{1, 64}, 128, at::kHalf},
                                   {{5, 37, 128}, 512, at::kHalf}};
  for (const Case& c : cases) {
    const int64_t width = c.shape.back();
    INFO("shape " << at::IntArrayRef(c.shape) << " hidden " << c.hidden << " dtype " << c10::toString(c.dtype));
    torch::manual_seed(static_cast<uint64_t>(width + c.hidden));
    const auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(c.dtype);
    const double s1 = 1.0 / std::sqrt(static_cast<double>(width)), s2 = 1.0 / std::sqrt(static_cast<double>(c.hidden));
    const auto x = torch::randn(c.shape, opts).requires_grad_();
    const auto w1 = (torch::randn({c.hidden, width}, opts) * s1).requires_grad_();
    const auto b1 = (torch::randn({c.hidden}, opts) * 0.5).requires_grad_();
    const auto w2 = (torch::randn({width, c.hidden}, opts) * s2).requires_grad_();
    const auto b2 = (torch::randn({width}, opts) * 0.5).requires_grad_();
    REQUIRE(longnet::fusion::gelu_mlp_takes(x, w1, b1, w2, b2));
    const auto y = longnet::fusion::gelu_mlp(x, w1, b1, w2, b2);
    REQUIRE(y.scalar_type() == c.dtype);
    REQUIRE(y.sizes() == x.sizes());
    const auto dy = torch::randn(c.shape, opts);
    y.backward(dy);

    const auto d64 = [](const at::Tensor& t) { return t.detach().cpu().to(at::kDouble).requires_grad_(); };
    const auto x64 = d64(x), w164 = d64(w1), b164 = d64(b1), w264 = d64(w2), b264 = d64(b2);
    const auto y64 = at::linear(at::gelu(at::linear(x64, w164, b164), "tanh"), w264, b264);
    y64.backward(dy.cpu().to(at::kDouble));
    // 16-bit operands and outputs (bf16 keeps 8 bits), float32 accumulation; the hidden activation is rounded to 16
    // bits before fc2 as in any 16-bit MLP.
    const double tol = c.dtype == at::kBFloat16 ? 1.5e-2 : 3e-3;
    CHECK(relative_error(y, y64) < tol);
    CHECK(relative_error(x.grad(), x64.grad()) < tol);
    CHECK(relative_error(w1.grad(), w164.grad()) < tol);
    CHECK(relative_error(b1.grad(), b164.grad()) < tol);
    CHECK(relative_error(w2.grad(), w264.grad()) < tol);
    CHECK(relative_error(b2.grad(), b264.grad()) < tol);
  }
}

TEST_CASE("gelu_mlp_takes refuses what the GEMMs do not take", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  const auto bf = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  const auto x = torch::randn({4, 64}, bf), w1 = torch::randn({128, 64}, bf), b1 = torch::randn({128}, bf),
             w2 = torch::randn({64, 128}, bf), b2 = torch::randn({64}, bf);
  CHECK(longnet::fusion::gelu_mlp_takes(x, w1, b1, w2, b2));
  CHECK_FALSE(longnet::fusion::gelu_mlp_takes(x.to(torch::kFloat), w1, b1, w2, b2));  // float32
  CHECK_FALSE(longnet::fusion::gelu_mlp_takes(x, w1, b1.to(torch::kHalf), w2, b2));  // mixed dtypes
  CHECK_FALSE(longnet::fusion::gelu_mlp_takes(x.cpu(), w1, b1, w2, b2));              // another device
  CHECK_FALSE(longnet::fusion::gelu_mlp_takes(x.narrow(0, 0, 0), w1, b1, w2, b2));    // no rows
  const auto x60 = torch::randn({4, 60}, bf), w160 = torch::randn({128, 60}, bf), w260 = torch::randn({60, 128}, bf),
             b260 = torch::randn({60}, bf);
  CHECK_FALSE(longnet::fusion::gelu_mlp_takes(x60, w160, b1, w260, b260));  // width not a multiple of 8
  CHECK_THROWS(longnet::fusion::gelu_mlp(x60, w160, b1, w260, b260));
}

TEST_CASE("a gelu_tanh block under autocast matches its MLP composed of torch operators", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  using namespace longnet::fusion;
  const ModelConfig model{.width = 256, .heads = 4, .kv_heads = 4, .mlp = MlpKind::gelu_tanh};
  const AttentionConfig attention{.dilated = {.segment_lengths = {64, 256}, .dilation_rates = {1, 4}}};
  torch::manual_seed(7);
  TransformerBlock block(model, attention);
  block->to(torch::kCUDA);
  const auto x0 = torch::randn({2, 512, 256}, torch::TensorOptions().device(torch::kCUDA));

  const auto run = [&](bool composed) {
    for (auto& p : block->parameters()) p.mutable_grad() = at::Tensor();
    const auto x = x0.clone().requires_grad_();
    at::Tensor y;
    {
      const longnet::test::CudaAutocast autocast(true, at::kBFloat16);
      const auto normed = block->mlp_norm()(x);
      if (composed) {
        auto params = block->named_parameters();
        y = at::linear(at::gelu(at::linear(normed, params["fc1.weight"], params["fc1.bias"]), "tanh"),
                       params["fc2.weight"], params["fc2.bias"]);
      } else {
        y = block->mlp(normed);
      }
    }
    y.to(at::kFloat).square().sum().backward();
    std::vector<at::Tensor> out{y.detach(), x.grad().detach()};
    for (auto& p : block->parameters()) {
      if (p.grad().defined()) out.push_back(p.grad().detach().clone());
    }
    return out;
  };
  const auto fused = run(false), composed = run(true);
  REQUIRE(fused.size() == composed.size());
  REQUIRE(fused.size() == 2 + 6);  // y, dx, the mlp norm's weight and bias, fc1's and fc2's weight and bias
  for (size_t i = 0; i < fused.size(); ++i) {
    INFO("tensor " << i);
    CHECK(relative_error(fused[i], composed[i]) < 2e-2);
  }
}
