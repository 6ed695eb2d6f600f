// fusion/layer_norm.h on a CUDA device: the one-kernel LayerNorm (float32 or 16-bit in, 16-bit out) against float64 on
// the CPU, forward and all gradients, and the module under autocast against torch's LayerNorm followed by the cast;
// blocks chained with each residual add in the next pre-norm's kernel (run_blocks) against the blocks called in turn,
// with a float32 and a bf16 residual stream; the norm after a stack (forward_keeping_dtype) and a multimodal model
// whose stream is bf16 throughout.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "fusion/block.h"
#include "fusion/layer_norm.h"
#include "fusion/multimodal_model.h"
#include "tests/fusion/block_chain.h"
#include "tests/fusion/multimodal_fixture.h"
#include "tests/support/autocast.h"

#include <catch2/catch.hpp>

using longnet::fusion::LayerNorm;
using longnet::fusion::layer_norm_to;

namespace {

double relative_error(const at::Tensor& got, const at::Tensor& want) {
  const auto g = got.detach().cpu().to(at::kDouble), w = want.detach().cpu().to(at::kDouble);
  return ((g - w).norm() / w.norm().clamp_min(1e-30)).item<double>();
}

// One way of x + a and its layer norm: the leaves (x, a, weight, bias, each requiring gradients) and the outputs.
struct AddNorm {
  std::vector<at::Tensor> leaves;
  at::Tensor sum, y;
};

// What the fused-add tests compare: add_layer_norm_to on copies of x0, a0, w0, b0, and the add followed by
// layer_norm_to on other copies.
std::pair<AddNorm, AddNorm> fused_and_unfused(const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& w0,
                                              const at::Tensor& b0, at::ScalarType dtype) {
  const auto leaves = [&] {
    return std::vector<at::Tensor>{x0.clone().requires_grad_(), a0.clone().requires_grad_(),
                                   w0.clone().requires_grad_(), b0.clone().requires_grad_()};
  };
  AddNorm fused{leaves(), {}, {}}, plain{leaves(), {}, {}};
  std::tie(fused.sum, fused.y) = longnet::fusion::add_layer_norm_to(fused.leaves[0], fused.leaves[1], fused.leaves[2],
                                                                    fused.leaves[3], 1e-5, dtype);
  plain.sum = plain.leaves[0] + plain.leaves[1];
  plain.y = layer_norm_to(plain.sum, plain.leaves[2], plain.leaves[3], 1e-5, dtype);
  return {fused, plain};
}

}  // namespace

TEST_CASE("layer_norm_to matches float64 layer norm, forward and gradients", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  struct Case {
    std::vector<int64_t> shape;
    at::ScalarType dtype;
  };
  // Widths: the model's 768 and 512, the largest (1024), one below a chunk of 128 (100) and the smallest (4); one
  // row, an odd row count, and a batched 3-d input.
  const std::vector<Case> cases = {{{2, 300, 768}, at::kBFloat16}, {{7, 512}, at::kHalf},  {{1, 1024}, at::kBFloat16},
                                   {{33, 100}, at::kBFloat16},     {{5, 4}, at::kHalf},     {{3, 4097, 768}, at::kHalf}};
  for (const Case& c : cases) {
    const int64_t width = c.shape.back();
    INFO("shape " << at::IntArrayRef(c.shape) << " dtype " << c10::toString(c.dtype));
    torch::manual_seed(static_cast<uint64_t>(width));
    const auto f32 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat);
    const auto x = (torch::randn(c.shape, f32) * 3 + 1).requires_grad_();
    const auto weight = (torch::randn({width}, f32) * 0.5 + 1).requires_grad_();
    const auto bias = (torch::randn({width}, f32) * 0.1).requires_grad_();
    const auto y = layer_norm_to(x, weight, bias, 1e-5, c.dtype);
    REQUIRE(y.scalar_type() == c.dtype);
    REQUIRE(y.sizes() == x.sizes());
    const auto dy = torch::randn(c.shape, f32).to(c.dtype);
    y.backward(dy);

    const auto x64 = x.detach().cpu().to(at::kDouble).requires_grad_();
    const auto w64 = weight.detach().cpu().to(at::kDouble).requires_grad_();
    const auto b64 = bias.detach().cpu().to(at::kDouble).requires_grad_();
    const auto y64 = at::layer_norm(x64, {width}, w64, b64, 1e-5);
    y64.backward(dy.cpu().to(at::kDouble));
    // The output is rounded once to 16 bits (relative 2^-9 for bf16, 2^-12 for fp16); the gradients are float32.
    const double out_tolerance = c.dtype == at::kBFloat16 ? 4e-3 : 5e-4;
    CHECK(relative_error(y, y64) < out_tolerance);
    CHECK(relative_error(x.grad(), x64.grad()) < 1e-5);
    CHECK(relative_error(weight.grad(), w64.grad()) < 1e-5);
    CHECK(relative_error(bias.grad(), b64.grad()) < 1e-5);
  }
}

TEST_CASE("layer_norm_to takes inputs that start off a 16-byte boundary", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  const auto f32 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat);
  // A contiguous view one float into its storage: the kernels' 16-byte vectors cannot read it in place.
  const auto storage = torch::randn({5 * 64 + 1}, f32);
  const auto x = storage.narrow(0, 1, 5 * 64).view({5, 64}).requires_grad_();
  REQUIRE(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0);
  const auto weight = torch::ones({64}, f32).requires_grad_(), bias = torch::zeros({64}, f32).requires_grad_();
  const auto y = layer_norm_to(x, weight, bias, 1e-5, at::kBFloat16);
  const auto want = at::layer_norm(x.detach().cpu().to(at::kDouble), {64}, {}, {}, 1e-5);
  CHECK(relative_error(y, want) < 4e-3);
  y.sum().backward();
  CHECK(x.grad().abs().max().item<double>() < 1e-4);  // d/dx of a sum of normalised values is ~0
}

TEST_CASE("add_layer_norm_to equals the add followed by layer_norm_to, to the bit, forward and gradients",
          "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    for (const bool sum_used : {true, false}) {
      INFO("dtype " << c10::toString(dtype) << ", sum used elsewhere " << sum_used);
      torch::manual_seed(9);
      const auto f32 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat);
      const auto x0 = torch::randn({3, 257, 768}, f32), a0 = torch::randn({3, 257, 768}, f32).to(dtype);
      const auto w0 = torch::randn({768}, f32) * 0.3 + 1, b0 = torch::randn({768}, f32) * 0.1;
      const auto gs = torch::randn({3, 257, 768}, f32), gy = torch::randn({3, 257, 768}, f32).to(dtype);
      const auto [fused, plain] = fused_and_unfused(x0, a0, w0, b0, dtype);
      CHECK(fused.sum.equal(plain.sum));
      CHECK(fused.y.equal(plain.y));
      auto loss = [&](const AddNorm& r) {
        const auto l = (r.y.to(at::kFloat) * gy.to(at::kFloat)).sum();
        return sum_used ? l + (r.sum * gs).sum() : l;
      };
      loss(fused).backward();
      loss(plain).backward();
      for (size_t i = 0; i < 4; ++i) {
        INFO("gradient of input " << i);
        CHECK(fused.leaves[i].grad().scalar_type() == plain.leaves[i].grad().scalar_type());
        CHECK(fused.leaves[i].grad().equal(plain.leaves[i].grad()));
      }
    }
  }
}

TEST_CASE("LayerNorm under CUDA autocast equals torch's LayerNorm then the cast and is torch's elsewhere",
          "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(5);
  LayerNorm ours(torch::nn::LayerNormOptions({768}));
  torch::nn::LayerNorm theirs(torch::nn::LayerNormOptions({768}));
  ours->to(torch::kCUDA);
  theirs->to(torch::kCUDA);
  torch::NoGradGuard no_grad;
  ours->weight.normal_(1.0, 0.2);
  ours->bias.normal_(0.0, 0.1);
  theirs->weight.copy_(ours->weight);
  theirs->bias.copy_(ours->bias);
  const auto x = torch::randn({4, 1000, 768}, torch::TensorOptions().device(torch::kCUDA)) * 2;
  {
    at::Tensor a, b;
    {
      const longnet::test::CudaAutocast autocast;
      a = ours(x);
      b = theirs(x);
    }
    REQUIRE(a.scalar_type() == at::kBFloat16);
    REQUIRE(b.scalar_type() == at::kFloat);  // autocast keeps layer_norm in float32
    // Both round the same float32 values (up to summation order) to bf16: nearly all are identical, none is more than
    // one bf16 step away.
    const auto b16 = b.to(at::kBFloat16).to(at::kFloat), a32 = a.to(at::kFloat);
    const double equal = (a32 == b16).to(at::kDouble).mean().item<double>();
    CHECK(equal > 0.99);
    CHECK(((a32 - b16).abs() <= b16.abs() * (1.0 / 128) + 1e-6).all().item<bool>());
  }
  // Without autocast, and for widths the kernel does not take, the module is torch's LayerNorm.
  CHECK(ours(x).equal(theirs(x)));
  LayerNorm odd(torch::nn::LayerNormOptions({6}));
  odd->to(torch::kCUDA);
  const auto x6 = torch::randn({3, 6}, torch::TensorOptions().device(torch::kCUDA));
  at::Tensor y6;
  {
    const longnet::test::CudaAutocast autocast;
    y6 = odd(x6);
  }
  CHECK(y6.scalar_type() == at::kFloat);
}

TEST_CASE("run_blocks under CUDA autocast equals calling the blocks in turn, forward and gradients", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  using namespace longnet::fusion;
  const ModelConfig model{.width = 128, .depth = 1, .heads = 2, .kv_heads = 2, .mlp = MlpKind::gelu,
                          .mlp_ratio = 4.0};
  const AttentionConfig attention{.dilated = {.segment_lengths = {64, 256}, .dilation_rates = {1, 4}}};
  auto blocks = longnet::test::seeded_blocks(model, attention, 3, 30, torch::kCUDA);
  torch::manual_seed(5);
  const auto x0 = torch::randn({2, 256, 128}, torch::TensorOptions().device(torch::kCUDA));
  const auto stream = longnet::test::chain_outputs(blocks, x0, true, true);
  const auto plain = longnet::test::chain_outputs(blocks, x0, false, true);
  REQUIRE(stream.size() == plain.size());
  CHECK(stream[0].scalar_type() == at::kFloat);  // the residual stream stays float32
  for (size_t i = 0; i < stream.size(); ++i) {
    CAPTURE(i);
    // The same arithmetic in other kernels (add_layer_norm_to is the add then layer_norm_to, to the bit); what
    // differs is the order of float32 sums in the kernels' own backward passes.
    CHECK(relative_error(stream[i], plain[i]) < 1e-4);
  }
}

TEST_CASE("a 16-bit residual stream: layer_norm_to and add_layer_norm_to against float64 and the unfused add",
          "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  for (const auto dtype : {at::kBFloat16, at::kHalf}) {
    INFO("dtype " << c10::toString(dtype));
    torch::manual_seed(13);
    const auto f32 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat);
    const auto x0 = (torch::randn({3, 257, 768}, f32) * 3 + 1).to(dtype);
    const auto a0 = torch::randn({3, 257, 768}, f32).to(dtype);
    const auto w0 = torch::randn({768}, f32) * 0.3 + 1, b0 = torch::randn({768}, f32) * 0.1;
    const auto gs = torch::randn({3, 257, 768}, f32).to(dtype), gy = torch::randn({3, 257, 768}, f32).to(dtype);
    // 16-bit gradients are rounded once (relative 2^-9 for bf16, 2^-12 for fp16).
    const double tolerance = dtype == at::kBFloat16 ? 4e-3 : 5e-4;

    // The layer norm alone, against float64 on the same (16-bit) input values.
    const auto x = x0.clone().requires_grad_();
    const auto w = w0.clone().requires_grad_(), b = b0.clone().requires_grad_();
    const auto y = layer_norm_to(x, w, b, 1e-5, dtype);
    REQUIRE(y.scalar_type() == dtype);
    y.backward(gy);
    REQUIRE(x.grad().scalar_type() == dtype);
    const auto x64 = x0.cpu().to(at::kDouble).requires_grad_();
    const auto w64 = w0.cpu().to(at::kDouble).requires_grad_(), b64 = b0.cpu().to(at::kDouble).requires_grad_();
    const auto y64 = at::layer_norm(x64, {768}, w64, b64, 1e-5);
    y64.backward(gy.cpu().to(at::kDouble));
    CHECK(relative_error(y, y64) < tolerance);
    CHECK(relative_error(x.grad(), x64.grad()) < tolerance);
    CHECK(relative_error(w.grad(), w64.grad()) < 1e-5);
    CHECK(relative_error(b.grad(), b64.grad()) < 1e-5);

    // The fused add: the forward is the 16-bit add, then layer_norm_to, to the bit; the backward rounds the sum of
    // both gradients of x + a once, where the unfused one rounds the layer norm's gradient and then the sum.
    const auto [fused, plain] = fused_and_unfused(x0, a0, w0, b0, dtype);
    REQUIRE(fused.sum.scalar_type() == dtype);
    CHECK(fused.sum.equal(plain.sum));
    CHECK(fused.y.equal(plain.y));
    const auto loss = [&](const AddNorm& r) {
      return (r.y.to(at::kFloat) * gy.to(at::kFloat)).sum() + (r.sum.to(at::kFloat) * gs.to(at::kFloat)).sum();
    };
    loss(fused).backward();
    loss(plain).backward();
    const auto& dx = fused.leaves[0].grad();
    CHECK(dx.scalar_type() == dtype);
    CHECK(dx.equal(fused.leaves[1].grad()));  // d(x + a)/dx = d(x + a)/da
    CHECK(relative_error(dx, plain.leaves[0].grad()) < 2 * tolerance);
    CHECK(fused.leaves[2].grad().equal(plain.leaves[2].grad()));
    CHECK(fused.leaves[3].grad().equal(plain.leaves[3].grad()));
  }
}

TEST_CASE("run_blocks with autocast_residual keeps a bf16 stream, near the float32 stream's result", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  using namespace longnet::fusion;
  const auto make = [](bool autocast_residual) {
    const ModelConfig model{.width = 128, .depth = 1, .heads = 2, .kv_heads = 2, .mlp = MlpKind::gelu_tanh,
                            .mlp_ratio = 4.0, .autocast_residual = autocast_residual};
    const AttentionConfig attention{.dilated = {.segment_lengths = {64, 256}, .dilation_rates = {1, 4}}};
    return longnet::test::seeded_blocks(model, attention, 3, 40, torch::kCUDA);
  };
  auto kept = make(true), wide = make(false);
  torch::manual_seed(6);
  const auto x0 = torch::randn({2, 256, 128}, torch::TensorOptions().device(torch::kCUDA));
  const auto stream = longnet::test::chain_outputs(kept, x0, true, true);
  const auto plain = longnet::test::chain_outputs(kept, x0, false, true);
  const auto f32 = longnet::test::chain_outputs(wide, x0, true, true);
  REQUIRE(stream.size() == plain.size());
  REQUIRE(stream.size() == f32.size());
  CHECK(stream[0].scalar_type() == at::kBFloat16);
  CHECK(f32[0].scalar_type() == at::kFloat);
  for (size_t i = 0; i < stream.size(); ++i) {
    CAPTURE(i);
    // Chained or called in turn: the same bf16 stream, but the fused backward rounds each residual gradient once.
    CHECK(relative_error(stream[i], plain[i]) < 1e-2);
    // Against a float32 stream: three blocks of bf16 rounding of every residual add, forward and backward.
    CHECK(relative_error(stream[i], f32[i]) < 3e-2);
  }
}

TEST_CASE("LayerNorm::forward_keeping_dtype: a 16-bit input under autocast stays 16-bit, float32 is torch's",
          "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  torch::manual_seed(8);
  LayerNorm norm(torch::nn::LayerNormOptions({256}));
  norm->to(torch::kCUDA);
  torch::NoGradGuard no_grad;
  norm->weight.normal_(1.0, 0.2);
  norm->bias.normal_(0.0, 0.1);
  const auto x = torch::randn({3, 500, 256}, torch::TensorOptions().device(torch::kCUDA));
  const auto x16 = x.to(at::kBFloat16);
  at::Tensor kept, widened;
  {
    const longnet::test::CudaAutocast autocast;
    kept = norm->forward_keeping_dtype(x16);
    widened = norm->forward_keeping_dtype(x);
  }
  CHECK(kept.scalar_type() == at::kBFloat16);
  CHECK(kept.equal(layer_norm_to(x16, norm->weight, norm->bias, 1e-5, at::kBFloat16)));
  CHECK(widened.scalar_type() == at::kFloat);  // as torch's LayerNorm under autocast
  CHECK(widened.equal(at::layer_norm(x, {256}, norm->weight, norm->bias, 1e-5)));
}

TEST_CASE("a multimodal model with autocast_residual: bf16 tokens after the stacks, outputs near the float32 stream's",
          "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  using namespace longnet;
  using longnet::modalities::Modality;
  const std::string strategy = GENERATE(from_range(test::all_strategies()));
  const bool no_audio = GENERATE(false, true);  // audio given, but no sample has it: its tokens are all zeros
  CAPTURE(strategy, no_audio);
  const auto make = [&strategy](bool autocast_residual) {
    fusion::ModelConfig model = test::tiny_model();
    model.autocast_residual = autocast_residual;
    torch::manual_seed(7);
    fusion::MultimodalModel m(model, test::tiny_attention(), test::tiny_config(strategy));
    m->to(torch::kCUDA);
    return m;
  };
  // Four samples, one without an image and one with neither text nor video: absent rows take the zero-filled path.
  fusion::MultimodalInput in = test::full_batch(4, 2, torch::kFloat);
  in.present[1][test::mi(Modality::image)] = false;
  in.present[2][test::mi(Modality::text)] = in.present[2][test::mi(Modality::video)] = false;
  if (no_audio) in.present.select(1, static_cast<int64_t>(test::mi(Modality::audio))).fill_(false);
  for (auto& m : in.modalities) {
    if (!m) continue;
    for (at::Tensor* t : {&m->data, &m->positions, &m->padding}) {
      if (t->defined()) *t = t->to(torch::kCUDA);
    }
  }
  struct Run {
    fusion::MultimodalOutput out;
    std::vector<at::Tensor> grads;
  };
  const auto run = [&in](fusion::MultimodalModel& m) {
    Run r;
    {
      const test::CudaAutocast guard;
      r.out = m(in);
    }
    at::Tensor loss = r.out.joint.to(at::kFloat).pow(2).sum() + r.out.lm_logits.to(at::kFloat).pow(2).mean();
    for (const auto& e : r.out.embeddings) {
      if (e.defined()) loss = loss + e.to(at::kFloat).sum();
    }
    loss.backward();
    for (const auto& p : m->parameters()) r.grads.push_back(p.grad().defined() ? p.grad() : at::zeros_like(p));
    return r;
  };
  auto kept_model = make(true), wide_model = make(false);
  const Run kept = run(kept_model), wide = run(wide_model);
  const auto video = test::mi(Modality::video), image = test::mi(Modality::image);
  CHECK(kept.out.tokens[video].scalar_type() == at::kBFloat16);
  CHECK(wide.out.tokens[video].scalar_type() == at::kFloat);
  CHECK(kept.out.tokens[image][1].eq(0).all().item<bool>());  // the absent image row: exactly zero
  CHECK(kept.out.tokens[test::mi(Modality::audio)].scalar_type() == at::kBFloat16);
  // Every residual add of the stacks and the fusion rounded to bf16, forward and backward.
  CHECK(relative_error(kept.out.joint, wide.out.joint) < 3e-2);
  for (size_t m = 0; m < kept.out.embeddings.size(); ++m) {
    CAPTURE(m);
    if (wide.out.embeddings[m].defined()) CHECK(relative_error(kept.out.embeddings[m], wide.out.embeddings[m]) < 3e-2);
  }
  CHECK(relative_error(kept.out.lm_logits, wide.out.lm_logits) < 3e-2);
  REQUIRE(kept.grads.size() == wide.grads.size());
  double worst = 0;
  for (size_t i = 0; i < kept.grads.size(); ++i) {
    if (wide.grads[i].norm().item<double>() > 0) worst = std::max(worst, relative_error(kept.grads[i], wide.grads[i]));
  }
  std::cout << "[autocast_residual model] " << strategy << ": worst parameter gradient relative error " << worst
            << "\n";
  CHECK(worst < 0.1);
}
