// MultiheadDilatedAttention and the position helpers, in float64 on CPU: the module against a hand-written
// projection → position encoding → dilated_attention → out projection, position-encoding properties, GQA, causality,
// padding, qk-LayerNorm, T5 buckets, gradients and option validation.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "attention/dilated_attention.h"
#include "attention/multihead_dilated_attention.h"
#include "attention/positional.h"
#include "attention/reference.h"
#include "core/error.h"
#include "tests/support/single_threaded.h"

using namespace longnet::attention;

namespace {

constexpr double kTol = 1e-10;

MultiheadDilatedAttentionOptions small_options(PositionEncoding position, bool causal = false) {
  return MultiheadDilatedAttentionOptions{
      .embed_dim = 16,
      .heads = 4,
      .kv_heads = 2,
      .dilated = {.segment_lengths = {4, 8}, .dilation_rates = {1, 2}, .causal = causal, .backend = Backend::reference},
      .position = position,
  };
}

// A float64 module whose parameters are all random, so that LayerNorm affines and the bias table matter.
MultiheadDilatedAttention make_module(const MultiheadDilatedAttentionOptions& options, uint64_t seed = 7) {
  torch::manual_seed(seed);
  MultiheadDilatedAttention m(options);
  m->to(torch::kDouble);
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.copy_(torch::randn_like(p) * 0.5);
  return m;
}

at::Tensor param(const MultiheadDilatedAttention& m, const std::string& name) {
  return m->named_parameters(/*recurse=*/true)[name];
}

// The module's computation written out with explicit per-position rotation tables (absolute, uncentred xPos).
at::Tensor hand_forward(const MultiheadDilatedAttention& m, const at::Tensor& x,
                        const std::optional<at::Tensor>& key_padding_mask = std::nullopt) {
  const auto& o = m->options();
  const int64_t b = x.size(0), n = x.size(1), h = o.heads, hkv = o.kv_heads, d = o.head_dim();
  at::Tensor q = torch::linear(x, param(m, "q_proj.weight"), param(m, "q_proj.bias")).view({b, n, h, d});
  at::Tensor k = torch::linear(x, param(m, "k_proj.weight"), param(m, "k_proj.bias")).view({b, n, hkv, d});
  at::Tensor v = torch::linear(x, param(m, "v_proj.weight"), param(m, "v_proj.bias")).view({b, n, hkv, d});
  if (o.qk_layernorm) {
    q = torch::layer_norm(q, {d}, param(m, "q_norm.weight"), param(m, "q_norm.bias"));
    k = torch::layer_norm(k, {d}, param(m, "k_norm.weight"), param(m, "k_norm.bias"));
  }
  if (o.position == PositionEncoding::rope || o.position == PositionEncoding::xpos) {
    auto rotate = [&](const at::Tensor& t, bool is_query) {
      at::Tensor out = t.clone();
      const int64_t half = d / 2;
      for (int64_t p = 0; p < n; ++p) {
        for (int64_t i = 0; i < half; ++i) {
          const double angle = static_cast<double>(p) * std::pow(o.rope_theta, -2.0 * static_cast<double>(i) / d);
          double s = 1.0;
          if (o.position == PositionEncoding::xpos) {
            const double zeta = (2.0 * static_cast<double>(i) / d + 0.4) / 1.4;
            s = std::pow(zeta, (is_query ? 1.0 : -1.0) * static_cast<double>(p) / o.xpos_scale_base);
          }
          const at::Tensor a = t.select(1, p).select(-1, i), c = t.select(1, p).select(-1, i + half);
          out.select(1, p).select(-1, i).copy_((a * std::cos(angle) - c * std::sin(angle)) * s);
          out.select(1, p).select(-1, i + half).copy_((c * std::cos(angle) + a * std::sin(angle)) * s);
        }
      }
      return out;
    };
    q = rotate(q, true);
    k = rotate(k, false);
  }
  AttentionOptions attention_options;
  attention_options.key_padding_mask = key_padding_mask;
  if (o.position == PositionEncoding::relative_bias) {
    attention_options.relative_bias = RelativePositionBias{.table = param(m, "relative_bias_table"),
                                                           .num_buckets = o.relative_num_buckets,
                                                           .max_distance = o.relative_max_distance,
                                                           .bidirectional = !o.dilated.causal};
  }
  at::Tensor out = dilated_attention(q, k, v, o.dilated, attention_options).out.reshape({b, n, h * d});
  if (o.sub_layernorm) out = torch::layer_norm(out, {h * d}, param(m, "sub_norm.weight"), param(m, "sub_norm.bias"));
  return torch::linear(out, param(m, "out_proj.weight"), param(m, "out_proj.bias"));
}

at::Tensor random_input(int64_t b, int64_t n, int64_t c, uint64_t seed = 1) {
  torch::manual_seed(seed);
  return torch::randn({b, n, c}, torch::kDouble);
}

const std::vector<PositionEncoding> kPositions = {PositionEncoding::none, PositionEncoding::rope, PositionEncoding::xpos,
                                                  PositionEncoding::relative_bias};

}  // namespace

TEST_CASE("module equals projections + position encoding + dilated_attention + out projection", "[attention][cpu]") {
  const auto position = GENERATE(PositionEncoding::none, PositionEncoding::rope, PositionEncoding::xpos,
                                 PositionEncoding::relative_bias);
  const bool causal = GENERATE(false, true);
  const bool qk_layernorm = GENERATE(false, true);
  const bool sub_layernorm = GENERATE(false, true);
  CAPTURE(to_string(position), causal, qk_layernorm, sub_layernorm);
  auto options = small_options(position, causal);
  options.qk_layernorm = qk_layernorm;
  options.sub_layernorm = sub_layernorm;
  auto m = make_module(options);
  const at::Tensor x = random_input(2, 11, 16);  // N = 11: ragged last segment for both branches
  const at::Tensor y = m(x);
  REQUIRE(y.sizes() == at::IntArrayRef{2, 11, 16});
  REQUIRE(y.scalar_type() == at::kDouble);
  REQUIRE(torch::allclose(y, hand_forward(m, x), kTol, kTol));
}

TEST_CASE("relative bias adds table[h, T5 bucket(key - query)] to the scores", "[attention][cpu]") {
  // One branch with w ≥ N and r = 1 is dense attention, so the module must equal softmax(q kᵀ/√D + bias) v.
  const bool causal = GENERATE(false, true);
  CAPTURE(causal);
  auto options = small_options(PositionEncoding::relative_bias, causal);
  options.kv_heads = 4;
  options.dilated.segment_lengths = {64};
  options.dilated.dilation_rates = {1};
  options.relative_num_buckets = 8;  // small table, so that a 40-token sequence reaches the logarithmic buckets
  options.relative_max_distance = 20;
  auto m = make_module(options);
  const int64_t n = 40, h = 4, d = 4;
  const at::Tensor x = random_input(1, n, 16);
  auto [q, k] = m->queries_and_keys(x);
  const at::Tensor v = torch::linear(x, param(m, "v_proj.weight"), param(m, "v_proj.bias")).view({1, n, h, d});
  const at::Tensor table = param(m, "relative_bias_table");
  at::Tensor scores = torch::einsum("bqhd,bkhd->bhqk", {q, k}) / std::sqrt(static_cast<double>(d));
  at::Tensor bias = torch::zeros({h, n, n}, torch::kDouble);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t bucket = relative_position_bucket(j - i, 8, 20, !causal);
      bias.select(1, i).select(1, j).copy_(table.select(1, bucket));
    }
  }
  scores = scores + bias.unsqueeze(0);
  if (causal) scores = scores.masked_fill(torch::ones({n, n}, torch::kBool).triu(1), -INFINITY);
  const at::Tensor o = torch::einsum("bhqk,bkhd->bqhd", {scores.softmax(-1), v}).reshape({1, n, h * d});
  const at::Tensor expected = torch::linear(o, param(m, "out_proj.weight"), param(m, "out_proj.bias"));
  REQUIRE(torch::allclose(m(x), expected, kTol, kTol));
}

TEST_CASE("T5 relative position buckets match hand-computed values", "[attention][cpu]") {
  // Bidirectional, 32 buckets, max distance 128: 16 per side, 8 exact, then 8 + floor(log(d/8)/log(16)·8).
  const std::vector<std::pair<int64_t, int64_t>> bidirectional = {
      {0, 0}, {-1, 1}, {1, 17}, {-7, 7}, {-8, 8}, {-16, 10}, {16, 26}, {-20, 10}, {20, 26}, {-64, 14}, {127, 31},
      {128, 31}, {-200, 15}, {5000, 31}};
  // Causal, 32 buckets: positive distances → 0; 16 exact, then 16 + floor(log(d/16)/log(8)·16).
  const std::vector<std::pair<int64_t, int64_t>> causal = {
      {5, 0}, {0, 0}, {-5, 5}, {-15, 15}, {-16, 16}, {-32, 21}, {-40, 23}, {-64, 26}, {-128, 31}, {-1000, 31}};
  for (const auto& [distance, bucket] : bidirectional) {
    CAPTURE(distance);
    REQUIRE(relative_position_bucket(distance, 32, 128, /*bidirectional=*/true) == bucket);
  }
  for (const auto& [distance, bucket] : causal) {
    CAPTURE(distance);
    REQUIRE(relative_position_bucket(distance, 32, 128, /*bidirectional=*/false) == bucket);
  }
}

TEST_CASE("rotary and xPos scores depend only on the distance", "[attention][cpu]") {
  const int64_t d = 8;
  torch::manual_seed(3);
  const at::Tensor q0 = torch::randn({1, 1, 1, d}, torch::kDouble), k0 = torch::randn({1, 1, 1, d}, torch::kDouble);
  const bool xpos = GENERATE(false, true);
  CAPTURE(xpos);
  auto score = [&](int64_t m, int64_t n) {
    auto encode = [&](const at::Tensor& t, int64_t p, double sign) {
      const at::Tensor pos = torch::tensor({p}, torch::kLong);
      const auto [cos, sin] = rotary_cos_sin(pos, d, 10000.0);
      return xpos ? apply_rotary(t, cos, sin, xpos_scale(pos * static_cast<int64_t>(sign), d, 512.0))
                  : apply_rotary(t, cos, sin);
    };
    return (encode(q0, m, 1.0) * encode(k0, n, -1.0)).sum().item<double>();
  };
  for (int64_t shift : {1, 7, 100, 3000}) {
    CAPTURE(shift);
    REQUIRE(score(5, 2) == Approx(score(5 + shift, 2 + shift)).epsilon(1e-9));
    REQUIRE(score(2, 5) == Approx(score(2 + shift, 5 + shift)).epsilon(1e-9));
  }
  REQUIRE(score(5, 2) != Approx(score(6, 2)).epsilon(1e-6));  // the distance does matter
  SECTION("rotation preserves norms; xPos decays with distance") {
    const auto [cos, sin] = rotary_cos_sin(torch::tensor({37}, torch::kLong), d, 10000.0);
    REQUIRE(apply_rotary(q0, cos, sin).norm().item<double>() == Approx(q0.norm().item<double>()).epsilon(1e-12));
    const at::Tensor scale = xpos_scale(torch::arange(0, 2048, 512, torch::kLong), d, 512.0);  // (4, D/2)
    REQUIRE((scale.select(0, 0) == 1.0).all().item<bool>());
    REQUIRE((scale.select(0, 1) < 1.0).all().item<bool>());
    REQUIRE((scale.select(0, 3) < scale.select(0, 2)).all().item<bool>());
  }
}

TEST_CASE("module queries and keys see relative positions only (rope, xpos)", "[attention][cpu]") {
  // Every token identical: with position encoding the score q_i·k_j must depend on i - j alone (a Toeplitz matrix).
  const auto position = GENERATE(PositionEncoding::rope, PositionEncoding::xpos);
  CAPTURE(to_string(position));
  auto m = make_module(small_options(position));
  const at::Tensor x = random_input(1, 1, 16).expand({1, 12, 16}).contiguous();
  auto [q, k] = m->queries_and_keys(x);
  const at::Tensor scores = torch::einsum("bqhd,bkhd->hqk", {q.narrow(2, 0, 1), k.narrow(2, 0, 1)})[0];  // (N, N)
  for (int64_t i = 1; i < 12; ++i) {
    for (int64_t j = 1; j < 12; ++j) {
      REQUIRE(scores[i][j].item<double>() == Approx(scores[i - 1][j - 1].item<double>()).epsilon(1e-9));
    }
  }
  REQUIRE(scores[0][1].item<double>() != Approx(scores[0][2].item<double>()).epsilon(1e-6));
}

TEST_CASE("grouped-query and multi-query heads", "[attention][cpu]") {
  const int64_t kv_heads = GENERATE(4, 2, 1);
  CAPTURE(kv_heads);
  auto options = small_options(PositionEncoding::rope);
  options.kv_heads = kv_heads;
  auto m = make_module(options);
  REQUIRE(param(m, "q_proj.weight").sizes() == at::IntArrayRef{16, 16});
  REQUIRE(param(m, "k_proj.weight").sizes() == at::IntArrayRef{kv_heads * 4, 16});
  REQUIRE(param(m, "v_proj.weight").sizes() == at::IntArrayRef{kv_heads * 4, 16});
  const at::Tensor x = random_input(3, 9, 16);
  auto [q, k] = m->queries_and_keys(x);
  REQUIRE(q.sizes() == at::IntArrayRef{3, 9, 4, 4});
  REQUIRE(k.sizes() == at::IntArrayRef{3, 9, kv_heads, 4});
  const at::Tensor y = m(x);
  REQUIRE(y.sizes() == at::IntArrayRef{3, 9, 16});
  REQUIRE(torch::allclose(y, hand_forward(m, x), kTol, kTol));
}

TEST_CASE("causal module: future tokens do not change earlier outputs", "[attention][cpu]") {
  const auto position = GENERATE(PositionEncoding::none, PositionEncoding::rope, PositionEncoding::xpos,
                                 PositionEncoding::relative_bias);
  CAPTURE(to_string(position));
  auto m = make_module(small_options(position, /*causal=*/true));
  const at::Tensor x = random_input(2, 13, 16);
  at::Tensor x2 = x.clone();
  const int64_t t = 6;
  x2.narrow(1, t + 1, 13 - t - 1).add_(torch::randn({2, 13 - t - 1, 16}, torch::kDouble));
  const at::Tensor y = m(x), y2 = m(x2);
  REQUIRE(torch::allclose(y.narrow(1, 0, t + 1), y2.narrow(1, 0, t + 1), kTol, kTol));
  REQUIRE_FALSE(torch::allclose(y.narrow(1, t + 1, 1), y2.narrow(1, t + 1, 1), 1e-6, 1e-6));
}

TEST_CASE("padding keys do not change the outputs of valid positions", "[attention][cpu]") {
  const auto position = GENERATE(PositionEncoding::none, PositionEncoding::rope, PositionEncoding::relative_bias);
  CAPTURE(to_string(position));
  auto m = make_module(small_options(position));
  const at::Tensor x = random_input(2, 10, 16);
  at::Tensor mask = torch::zeros({2, 10}, torch::kBool);
  mask[0].narrow(0, 7, 3).fill_(true);  // sample 0: 7 tokens; sample 1: no padding
  mask[1][4] = true;                    // and a hole in the middle
  at::Tensor x2 = x.clone();
  x2[0].narrow(0, 7, 3).add_(5.0);
  x2[1][4].add_(5.0);
  const at::Tensor y = m(x, mask), y2 = m(x2, mask);
  const at::Tensor valid = mask.logical_not();
  REQUIRE(torch::allclose(y.index({valid}), y2.index({valid}), kTol, kTol));
  REQUIRE(torch::allclose(y, hand_forward(m, x, mask), kTol, kTol));
  REQUIRE_FALSE(torch::allclose(y, m(x), 1e-6, 1e-6));  // the mask is applied at all
}

TEST_CASE("qk-LayerNorm normalises each head's query and key over D", "[attention][cpu]") {
  auto options = small_options(PositionEncoding::none);
  options.qk_layernorm = true;
  torch::manual_seed(5);
  MultiheadDilatedAttention m(options);  // default affine: weight 1, bias 0
  m->to(torch::kDouble);
  REQUIRE(m->named_parameters().contains("q_norm.weight"));
  REQUIRE(m->named_parameters()["k_norm.weight"].sizes() == at::IntArrayRef{4});
  auto [q, k] = m->queries_and_keys(random_input(2, 6, 16) * 10.0);
  for (const at::Tensor& t : {q, k}) {
    REQUIRE(torch::allclose(t.mean(-1), torch::zeros_like(t.mean(-1)), 1e-9, 1e-9));
    REQUIRE(torch::allclose(t.var(-1, /*unbiased=*/false), torch::ones_like(t.mean(-1)), 1e-3, 1e-3));
  }
}

TEST_CASE("every parameter receives a gradient", "[attention][cpu]") {
  const auto position = GENERATE(PositionEncoding::none, PositionEncoding::rope, PositionEncoding::xpos,
                                 PositionEncoding::relative_bias);
  CAPTURE(to_string(position));
  auto options = small_options(position, /*causal=*/true);
  options.qk_layernorm = true;
  options.sub_layernorm = true;
  options.dropout = 0.1;  // in training mode, so the dropout path is the one differentiated
  auto m = make_module(options);
  m->train();
  const at::Tensor x = random_input(2, 9, 16).requires_grad_(true);
  m(x).pow(2).sum().backward();
  const auto names = m->named_parameters();
  REQUIRE(names.size() == 4 * 2 + 2 * 2 + 2 + (position == PositionEncoding::relative_bias ? 1 : 0));
  for (const auto& item : names) {
    CAPTURE(item.key());
    REQUIRE(item.value().grad().defined());
    REQUIRE(item.value().grad().abs().sum().item<double>() > 0.0);
  }
  REQUIRE(x.grad().abs().sum().item<double>() > 0.0);
}

TEST_CASE("the module's rotary tables follow the sequence length from call to call", "[attention][cpu]") {
  const auto position = GENERATE(PositionEncoding::rope, PositionEncoding::xpos);
  CAPTURE(to_string(position));
  auto m = make_module(small_options(position));
  // The tables are kept while the length repeats and made anew when it changes (xPos centres on the length).
  for (const int64_t n : {9, 12, 12, 9, 5}) {
    CAPTURE(n);
    const at::Tensor x = random_input(2, n, 16);
    REQUIRE(torch::allclose(m(x), hand_forward(m, x), kTol, kTol));
  }
  // Tables made in inference mode are not kept for a later call whose backward would save them.
  const at::Tensor x = random_input(2, 9, 16).requires_grad_(true);
  {
    const c10::InferenceMode inference;
    REQUIRE(torch::allclose(m(x.detach()), hand_forward(m, x.detach()), kTol, kTol));
  }
  m(x).pow(2).sum().backward();
  REQUIRE(x.grad().abs().sum().item<double>() > 0.0);
}

TEST_CASE("dropout acts in training mode only", "[attention][cpu]") {
  auto options = small_options(PositionEncoding::rope);
  options.dropout = 0.5;
  auto m = make_module(options);
  const at::Tensor x = random_input(1, 8, 16);
  m->eval();
  REQUIRE(torch::allclose(m(x), hand_forward(m, x), kTol, kTol));
  m->train();
  REQUIRE_FALSE(torch::allclose(m(x), m(x), 1e-6, 1e-6));
}

TEST_CASE("unsupported and invalid options throw ConfigError naming them", "[attention][cpu]") {
  auto options = small_options(PositionEncoding::relative_bias);
  SECTION("relative_bias with backend flash or fused") {
    options.dilated.backend = GENERATE(Backend::flash, Backend::fused);
    const std::string name = longnet::attention::to_string(options.dilated.backend);
    REQUIRE_THROWS_WITH(MultiheadDilatedAttention(options),
                        "attention option position = relative_bias is not supported by backend " + name +
                            " (its kernels take no score bias); use backend reference or auto");
    REQUIRE_THROWS_AS(options.validate(), longnet::ConfigError);
  }
  SECTION("relative_bias with backend auto and reference is fine") {
    options.dilated.backend = GENERATE(Backend::automatic, Backend::reference);
    REQUIRE_NOTHROW(MultiheadDilatedAttention(options));
  }
  SECTION("kv_heads must divide heads") {
    options.kv_heads = 3;
    REQUIRE_THROWS_WITH(options.validate(), "multihead dilated attention: kv_heads = 3 must divide heads = 4");
  }
  SECTION("heads must divide embed_dim") {
    options.heads = 5;
    options.kv_heads = 5;
    REQUIRE_THROWS_WITH(options.validate(), "multihead dilated attention: heads = 5 must divide embed_dim = 16");
  }
  SECTION("rope needs an even head dimension") {
    options.position = PositionEncoding::rope;
    options.embed_dim = 12;  // D = 3
    REQUIRE_THROWS_WITH(options.validate(),
                        "multihead dilated attention: position = rope needs an even head dimension, got 3 "
                        "(embed_dim / heads)");
  }
  SECTION("dropout range") {
    options.dropout = 1.0;
    REQUIRE_THROWS_AS(options.validate(), longnet::ConfigError);
  }
  SECTION("position names round-trip") {
    for (auto p : kPositions) REQUIRE(parse_position_encoding(to_string(p)) == p);
    REQUIRE_THROWS_WITH(parse_position_encoding("alibi"),
                        "unknown position encoding 'alibi' (expected none, rope, xpos or relative_bias)");
  }
  SECTION("wrong input width") {
    auto m = make_module(small_options(PositionEncoding::none));
    REQUIRE_THROWS_AS(m(torch::zeros({1, 4, 8}, torch::kDouble)), longnet::Error);
  }
}
