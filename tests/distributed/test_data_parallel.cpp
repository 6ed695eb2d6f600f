// Data parallelism in float64 with Gloo: the gradients GradientAllReduce leaves in .grad equal the single-process
// gradients of the full batch (with small buckets, gradient accumulation, and parameters without gradient), and with
// sequence parallelism inside (sequence groups of 2, data groups across) they equal the single-process gradients of
// the mean loss over all samples.
#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include "attention/dilated_attention.h"
#include "distributed/data_parallel.h"
#include "distributed/sequence_parallel.h"
#include "tests/distributed/world.h"

#include <catch2/catch.hpp>

using namespace longnet;
using namespace longnet::distributed;

namespace {

constexpr double kTol = 1e-10;

double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  return (actual - expected).abs().max().item<double>() / std::max(1.0, expected.abs().max().item<double>());
}

// A two-layer MLP in float64 with one parameter the loss never uses (it gets no gradient).
struct Mlp {
  at::Tensor w1, b1, w2, unused;
  explicit Mlp(uint64_t seed) {
    torch::manual_seed(seed);
    const auto f64 = torch::dtype(torch::kDouble);
    w1 = torch::randn({6, 5}, f64).requires_grad_();
    b1 = torch::randn({6}, f64).requires_grad_();
    w2 = torch::randn({3, 6}, f64).requires_grad_();
    unused = torch::randn({4}, f64).requires_grad_();
  }
  std::vector<at::Tensor> parameters() const { return {w1, b1, w2, unused}; }
  at::Tensor loss(const at::Tensor& x, const at::Tensor& y) const {
    const auto h = torch::tanh(torch::nn::functional::linear(x, w1, b1));
    return (torch::nn::functional::linear(h, w2) - y).pow(2).sum(-1).mean();
  }
};

}  // namespace

TEST_CASE("data parallel gradients equal the single-process full-batch gradients") {
  const auto& w = longnet::test::world();
  const int64_t per_rank = 4, micro = 2;  // two micro-batches of 2 samples per rank and step
  torch::manual_seed(99);
  const auto x = torch::randn({w.size * per_rank, 5}, torch::dtype(torch::kDouble));
  const auto y = torch::randn({w.size * per_rank, 3}, torch::dtype(torch::kDouble));

  const Mlp full(7);
  full.loss(x, y).backward();

  const Mlp local(7);
  CommStats stats;
  GradientAllReduce sync(local.parameters(), w.group, {.bucket_bytes = 64}, &stats);
  CHECK(sync.buckets() >= 3);  // 64-byte buckets: the parameters split into several
  for (int step = 0; step < 2; ++step) {  // the second step checks that the state resets
    for (const auto& p : local.parameters()) p.mutable_grad() = at::Tensor();
    for (int64_t m = 0; m < micro; ++m) {
      if (m + 1 == micro) sync.arm();
      const int64_t start = w.rank * per_rank + m * (per_rank / micro);
      const auto loss = local.loss(x.narrow(0, start, per_rank / micro), y.narrow(0, start, per_rank / micro));
      (loss / static_cast<double>(micro)).backward();
    }
    sync.finish();
    CHECK(relative_error(local.w1.grad(), full.w1.grad()) <= kTol);
    CHECK(relative_error(local.b1.grad(), full.b1.grad()) <= kTol);
    CHECK(relative_error(local.w2.grad(), full.w2.grad()) <= kTol);
    REQUIRE(local.unused.grad().defined());
    CHECK(local.unused.grad().abs().max().item<double>() == 0.0);
  }
  if (w.size > 1) CHECK(stats.bytes_sent > 0);
}

TEST_CASE("data parallel across sequence-parallel groups equals the single-process mean loss gradients") {
  const auto& w = longnet::test::world();
  const int sequence_size = w.size % 2 == 0 ? 2 : 1;
  const auto groups = longnet::test::split_world("dp", sequence_size);
  const int64_t samples = groups.data.size(), n = 19, embed = 8, heads = 2, head_dim = 4;
  const attention::DilatedAttentionConfig config{.segment_lengths = {4, 16}, .dilation_rates = {1, 2},
                                                 .causal = true, .backend = attention::Backend::reference};
  const auto f64 = torch::dtype(torch::kDouble);
  torch::manual_seed(5);
  const auto x = torch::randn({samples, n, embed}, f64);
  const auto target = torch::randn({samples, n, heads, head_dim}, f64);
  torch::manual_seed(6);
  const auto wq0 = torch::randn({heads * head_dim, embed}, f64), wk0 = torch::randn({heads * head_dim, embed}, f64),
             wv0 = torch::randn({heads * head_dim, embed}, f64);
  // Per-sample loss: Σ over tokens of out·target / n; the objective is its mean over samples.
  auto attend = [&](const at::Tensor& xs, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv) {
    const int64_t rows = xs.size(0);
    auto project = [&](const at::Tensor& m) {
      return torch::nn::functional::linear(xs, m).view({1, rows, heads, head_dim});
    };
    return std::tuple{project(wq), project(wk), project(wv)};
  };

  const auto wq = wq0.clone().requires_grad_(), wk = wk0.clone().requires_grad_(), wv = wv0.clone().requires_grad_();
  at::Tensor total = torch::zeros({}, f64);
  for (int64_t s = 0; s < samples; ++s) {
    const auto [q, k, v] = attend(x[s], wq, wk, wv);
    const auto out = attention::dilated_attention(q, k, v, config).out;
    total = total + (out[0] * target[s]).sum() / static_cast<double>(n);
  }
  (total / static_cast<double>(samples)).backward();

  const auto lq = wq0.clone().requires_grad_(), lk = wk0.clone().requires_grad_(), lv = wv0.clone().requires_grad_();
  GradientAllReduce sync({lq, lk, lv}, groups.world, {.divide_by = static_cast<double>(samples)});
  const int64_t sample = groups.data.rank();
  const auto part = sequence_part(n, groups.sequence.size(), groups.sequence.rank());
  const auto [q, k, v] = attend(x[sample].narrow(0, part.start, part.length), lq, lk, lv);
  const auto out = sequence_parallel_dilated_attention(q, k, v, config, {}, groups.sequence, n).out;
  sync.arm();
  ((out[0] * target[sample].narrow(0, part.start, part.length)).sum() / static_cast<double>(n)).backward();
  sync.finish();
  CHECK(relative_error(lq.grad(), wq.grad()) <= kTol);
  CHECK(relative_error(lk.grad(), wk.grad()) <= kTol);
  CHECK(relative_error(lv.grad(), wv.grad()) <= kTol);
}
