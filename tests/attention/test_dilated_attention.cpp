#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "attention/dilated_attention.h"
#include "attention/positional.h"
#include "attention/reference.h"
#include "core/error.h"
#include "tests/support/oracle.h"
#include "tests/support/tolerances.h"

using longnet::attention::AttentionOptions;
using longnet::attention::AttentionResult;
using longnet::attention::Backend;
using longnet::attention::DilatedAttentionConfig;
using longnet::attention::Mix;
using longnet::attention::RelativePositionBias;
using longnet::test::oracle_dilated_attention;
using longnet::test::relative_error;
using longnet::test::relative_tolerance;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// One attention problem; printed by CAPTURE so that a failure names its exact case.
struct Case {
  int64_t batch = 1, n = 16, heads = 2, kv_heads = 2, head_dim = 16;
  std::vector<int64_t> segments{8}, rates{1};
  bool causal = false;
  bool padding = false;           // random keys padded, and in batch 0 a padded tail
  bool bias = false;              // T5 relative position bias
  bool bidirectional_bias = true;
  uint64_t seed = 0;
  Mix mix = Mix::lse;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  const auto list = [&](const std::vector<int64_t>& xs) {
    os << '{';
    for (size_t i = 0; i < xs.size(); ++i) os << (i ? "," : "") << xs[i];
    os << '}';
  };
  os << "B=" << c.batch << " N=" << c.n << " H=" << c.heads << " Hkv=" << c.kv_heads << " D=" << c.head_dim << " w=";
  list(c.segments);
  os << " r=";
  list(c.rates);
  os << " causal=" << c.causal << " padding=" << c.padding << " bias=" << c.bias
     << " bidirectional=" << c.bidirectional_bias << " seed=" << c.seed
     << " mix=" << longnet::attention::to_string(c.mix);
  return os;
}

struct Problem {
  at::Tensor q, k, v;  // q: (B, N, H, D); k, v: (B, N, Hkv, D)
  DilatedAttentionConfig config;
  AttentionOptions options;
};

Problem make_problem(const Case& c, at::ScalarType dtype = at::kDouble) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(c.seed);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  Problem p;
  p.q = at::randn({c.batch, c.n, c.heads, c.head_dim}, gen, f64).to(dtype);
  p.k = at::randn({c.batch, c.n, c.kv_heads, c.head_dim}, gen, f64).to(dtype);
  p.v = at::randn({c.batch, c.n, c.kv_heads, c.head_dim}, gen, f64).to(dtype);
  p.config.segment_lengths = c.segments;
  p.config.dilation_rates = c.rates;
  p.config.causal = c.causal;
  p.config.mix = c.mix;
  if (c.padding) {
    auto mask = at::rand({c.batch, c.n}, gen, f64) < 0.25;  // (B, N) bool
    mask.select(0, 0).narrow(0, c.n - c.n / 4, c.n / 4).fill_(true);
    p.options.key_padding_mask = mask;
  }
  if (c.bias) {
    RelativePositionBias bias;
    bias.num_buckets = c.bidirectional_bias ? 16 : 8;
    bias.max_distance = 24;
    bias.bidirectional = c.bidirectional_bias;
    bias.table = at::randn({c.heads, bias.num_buckets}, gen, f64).to(dtype);
    p.options.relative_bias = bias;
  }
  return p;
}

// Random case: small N and D mostly, with every feature switched on at random.
Case random_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  Case c;
  c.seed = seed;
  c.batch = pick(1, 3);
  c.n = pick(8, 120);
  c.heads = pick(1, 8);
  std::vector<int64_t> divisors;
  for (int64_t d = 1; d <= c.heads; ++d) {
    if (c.heads % d == 0) divisors.push_back(d);
  }
  c.kv_heads = divisors[static_cast<size_t>(pick(0, static_cast<int64_t>(divisors.size()) - 1))];
  const int64_t dims[] = {16, 16, 16, 64, 128};
  c.head_dim = dims[pick(0, 4)];
  const int64_t branches = pick(1, 5);
  c.segments.clear();
  c.rates.clear();
  const int64_t rates[] = {1, 2, 3, 4, 8};
  for (int64_t i = 0; i < branches; ++i) {
    const int64_t r = rates[pick(0, 4)];
    c.rates.push_back(r);
    c.segments.push_back(r * pick(1, c.n / r + 3));  // sometimes w > N
  }
  c.causal = pick(0, 1) == 1;
  c.padding = pick(0, 1) == 1;
  c.bias = pick(0, 2) == 0;
  c.bidirectional_bias = !c.causal;
  return c;
}

// Hand-picked cases, so that every feature is covered whatever the random draws.
std::vector<Case> named_cases() {
  std::vector<Case> cases;
  const auto add = [&](Case c) {
    c.seed = 1000 + cases.size();
    cases.push_back(c);
  };
  add({.n = 64, .heads = 4, .kv_heads = 4, .segments = {16}, .rates = {1}});                       // one branch
  add({.n = 50, .heads = 4, .kv_heads = 4, .segments = {16, 32}, .rates = {1, 2}});              // N % w != 0
  add({.n = 20, .heads = 4, .kv_heads = 2, .segments = {32, 64}, .rates = {2, 4}});              // w > N
  add({.n = 40, .heads = 2, .kv_heads = 2, .segments = {8, 16}, .rates = {4, 8}});               // r > H
  add({.n = 36, .heads = 3, .kv_heads = 3, .segments = {12}, .rates = {2}, .causal = true});     // H % r != 0
  add({.batch = 3, .n = 45, .heads = 4, .kv_heads = 4, .segments = {10, 20}, .rates = {1, 2}, .causal = true,
       .padding = true});
  add({.batch = 2, .n = 24, .heads = 2, .kv_heads = 2, .head_dim = 64, .segments = {8}, .rates = {2}});
  add({.batch = 1, .n = 24, .heads = 2, .kv_heads = 1, .head_dim = 128, .segments = {8, 24}, .rates = {1, 3}});
  add({.batch = 2, .n = 100, .heads = 8, .kv_heads = 8, .segments = {4, 8, 16, 32, 64}, .rates = {1, 2, 4, 8, 16},
       .causal = true});                                                                          // five branches
  add({.n = 30, .heads = 6, .kv_heads = 2, .segments = {10, 30}, .rates = {1, 3}, .padding = true});  // GQA
  add({.n = 40, .heads = 4, .kv_heads = 4, .segments = {8, 40}, .rates = {1, 4}, .bias = true});  // bidirectional
  add({.batch = 2, .n = 33, .heads = 3, .kv_heads = 1, .segments = {9, 18}, .rates = {3, 2}, .causal = true,
       .padding = true, .bias = true, .bidirectional_bias = false});                              // everything
  return cases;
}

// head_split cases: every group of heads runs its own branch. Hand-picked so that ragged segments, w > N, groups
// smaller than r, uneven groups (H % K != 0), grouped-query heads across groups and K = 1 are all covered.
std::vector<Case> head_split_cases() {
  std::vector<Case> cases;
  const auto add = [&](Case c) {
    c.seed = 2000 + cases.size();
    c.mix = Mix::head_split;
    cases.push_back(c);
  };
  add({.n = 64, .heads = 4, .kv_heads = 4, .segments = {16, 32}, .rates = {1, 2}});              // two groups of 2
  add({.n = 50, .heads = 4, .kv_heads = 4, .segments = {16, 32}, .rates = {1, 2}, .causal = true});  // N % w != 0
  add({.batch = 3, .n = 45, .heads = 4, .kv_heads = 4, .segments = {10, 20}, .rates = {1, 2}, .causal = true,
       .padding = true});
  add({.n = 20, .heads = 4, .kv_heads = 2, .segments = {32, 64}, .rates = {2, 4}});              // w > N, GQA
  add({.n = 40, .heads = 4, .kv_heads = 4, .segments = {8, 16}, .rates = {4, 8}});               // r > group size
  add({.n = 36, .heads = 5, .kv_heads = 5, .segments = {12, 12, 36}, .rates = {1, 2, 3}});       // groups 1, 2, 2
  add({.n = 30, .heads = 6, .kv_heads = 2, .segments = {10, 30}, .rates = {1, 3}, .padding = true});  // GQA
  add({.n = 29, .heads = 6, .kv_heads = 3, .segments = {4, 8, 12, 16}, .rates = {1, 2, 3, 4}, .causal = true});
  add({.n = 40, .heads = 3, .kv_heads = 3, .segments = {12}, .rates = {2}, .causal = true});     // K = 1
  add({.batch = 2, .n = 48, .heads = 3, .kv_heads = 3, .segments = {8, 16, 32}, .rates = {1, 2, 4}, .causal = true,
       .padding = true});                                                                         // H = K
  add({.batch = 2, .n = 33, .heads = 3, .kv_heads = 1, .segments = {9, 18}, .rates = {3, 2}, .causal = true,
       .padding = true, .bias = true, .bidirectional_bias = false});                              // relative bias
  add({.batch = 2, .n = 100, .heads = 8, .kv_heads = 8, .segments = {4, 8, 16, 32, 64}, .rates = {1, 2, 4, 8, 16},
       .causal = true});                                                                          // five branches
  add({.batch = 2, .n = 24, .heads = 2, .kv_heads = 2, .head_dim = 64, .segments = {8, 24}, .rates = {2, 3}});
  return cases;
}

// A random case in head_split mode, with no more branches than heads.
Case random_head_split_case(uint64_t seed) {
  Case c = random_case(seed);
  const auto branches = static_cast<size_t>(std::min<int64_t>(c.heads, static_cast<int64_t>(c.segments.size())));
  c.segments.resize(branches);
  c.rates.resize(branches);
  c.mix = Mix::head_split;
  return c;
}

AttentionOptions with_table(const AttentionOptions& options, const at::Tensor& table) {
  AttentionOptions copy = options;
  if (copy.relative_bias) copy.relative_bias->table = table;
  return copy;
}

using AttentionFn = AttentionResult (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const DilatedAttentionConfig&, const AttentionOptions&);

AttentionResult run_public(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const DilatedAttentionConfig& config, const AttentionOptions& options) {
  return longnet::attention::dilated_attention(q, k, v, config, options);
}

// Forward results and the gradients of Σ out·g_out + Σ lse·g_lse (finite lse only), which exercises the gradient
// path through the LSE as well as through the outputs.
struct Evaluated {
  AttentionResult result;
  at::Tensor dq, dk, dv, dtable;
};

Evaluated evaluate(AttentionFn fn, const Problem& p, const at::Tensor& g_out, const at::Tensor& g_lse) {
  const auto q = p.q.detach().requires_grad_(true);
  const auto k = p.k.detach().requires_grad_(true);
  const auto v = p.v.detach().requires_grad_(true);
  std::vector<at::Tensor> inputs{q, k, v};
  at::Tensor table;
  if (p.options.relative_bias) {
    table = p.options.relative_bias->table.detach().requires_grad_(true);
    inputs.push_back(table);
  }
  const auto result = fn(q, k, v, p.config, with_table(p.options, table));
  const auto finite_lse = result.lse.masked_fill(torch::isinf(result.lse), 0.0);
  const auto loss = (result.out.to(torch::kDouble) * g_out).sum() + (finite_lse.to(torch::kDouble) * g_lse).sum();
  const auto grads = torch::autograd::grad({loss}, inputs);
  Evaluated e{{result.out.detach(), result.lse.detach()}, grads[0], grads[1], grads[2], {}};
  if (table.defined()) e.dtable = grads[3];
  return e;
}

// Upstream gradients for evaluate(): out-shaped and lse-shaped, float64.
std::pair<at::Tensor, at::Tensor> upstream(const Problem& p, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 7919);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  return {at::randn(p.q.sizes(), gen, f64), at::randn({p.q.size(0), p.q.size(2), p.q.size(1)}, gen, f64)};
}

void check_against_oracle(const Case& c, at::ScalarType dtype) {
  const Problem p = make_problem(c, dtype);
  const auto [g_out, g_lse] = upstream(p, c.seed);
  const auto got = evaluate(run_public, p, g_out, g_lse);
  const auto want = evaluate(oracle_dilated_attention, p, g_out, g_lse);
  const double tol = relative_tolerance(dtype);
  CHECK(got.result.out.scalar_type() == dtype);
  CHECK(got.result.lse.scalar_type() == (dtype == at::kDouble ? at::kDouble : at::kFloat));
  CHECK(relative_error(got.result.out, want.result.out) <= tol);
  CHECK(relative_error(got.result.lse, want.result.lse) <= tol);
  CHECK(relative_error(got.dq, want.dq) <= tol);
  CHECK(relative_error(got.dk, want.dk) <= tol);
  CHECK(relative_error(got.dv, want.dv) <= tol);
  if (c.bias) CHECK(relative_error(got.dtable, want.dtable) <= tol);
}

DilatedAttentionConfig make_config(std::vector<int64_t> segments, std::vector<int64_t> rates, bool causal = false) {
  DilatedAttentionConfig config;
  config.segment_lengths = std::move(segments);
  config.dilation_rates = std::move(rates);
  config.causal = causal;
  return config;
}

}  // namespace

TEST_CASE("reference matches the float64 oracle on hand-picked cases", "[attention][cpu]") {
  const auto cases = named_cases();
  const auto index = GENERATE_COPY(range(size_t{0}, cases.size()));
  const Case c = cases[index];
  CAPTURE(c);
  check_against_oracle(c, at::kDouble);
}

TEST_CASE("reference matches the float64 oracle on random cases", "[attention][cpu]") {
  const auto seed = GENERATE(range(uint64_t{1}, uint64_t{37}));
  const Case c = random_case(seed);
  CAPTURE(c);
  check_against_oracle(c, at::kDouble);
}

TEST_CASE("float32 reference stays close to the float64 oracle", "[attention][cpu]") {
  const auto seed = GENERATE(range(uint64_t{100}, uint64_t{106}));
  Case c = random_case(seed);
  CAPTURE(c);
  check_against_oracle(c, at::kFloat);
}

TEST_CASE("the oracle's multiplicity counts keys seen through several branches", "[attention][cpu]") {
  // N = 8, branches (4, 1) and (8, 2), head 0: query 0 sees keys 0-3 via the first and 0, 2, 4, 6 via the second.
  const auto count = longnet::test::branch_multiplicity(8, 2, make_config({4, 8}, {1, 2}));
  CHECK(torch::equal(count[0][0], torch::tensor({2., 1., 2., 1., 1., 0., 1., 0.}, torch::kDouble)));
  // Query 1 of head 0 is odd: only the first branch selects it.
  CHECK(torch::equal(count[0][1], torch::tensor({1., 1., 1., 1., 0., 0., 0., 0.}, torch::kDouble)));
  // Head 1 takes the odd rows of the second branch.
  CHECK(torch::equal(count[1][5], torch::tensor({0., 1., 0., 1., 1., 2., 1., 2.}, torch::kDouble)));
}

TEST_CASE("head_split reference matches the float64 oracle on hand-picked cases", "[attention][cpu]") {
  const auto cases = head_split_cases();
  const auto index = GENERATE_COPY(range(size_t{0}, cases.size()));
  const Case c = cases[index];
  CAPTURE(c);
  check_against_oracle(c, at::kDouble);
}

TEST_CASE("head_split reference matches the float64 oracle on random cases", "[attention][cpu]") {
  const auto seed = GENERATE(range(uint64_t{200}, uint64_t{224}));
  const Case c = random_head_split_case(seed);
  CAPTURE(c);
  check_against_oracle(c, at::kDouble);
}

TEST_CASE("the oracle's head_split multiplicity keeps each head's own branch", "[attention][cpu]") {
  // N = 8, branches (4, 1) and (8, 2), H = 2: head 0 attends through the first branch only, head 1 through the second.
  DilatedAttentionConfig config = make_config({4, 8}, {1, 2});
  config.mix = Mix::head_split;
  const auto count = longnet::test::branch_multiplicity(8, 2, config);
  CHECK(torch::equal(count[0][0], torch::tensor({1., 1., 1., 1., 0., 0., 0., 0.}, torch::kDouble)));
  CHECK(torch::equal(count[0][6], torch::tensor({0., 0., 0., 0., 1., 1., 1., 1.}, torch::kDouble)));
  // Head 1 has offset 1 in the second branch: its even queries see nothing.
  CHECK(torch::equal(count[1][0], torch::zeros({8}, torch::kDouble)));
  CHECK(torch::equal(count[1][5], torch::tensor({0., 1., 0., 1., 0., 1., 0., 1.}, torch::kDouble)));
}

TEST_CASE("head_split is each group's heads run through lse mode with its branch alone", "[attention][cpu]") {
  // Property, independent of the oracle: the heads [floor(i·H/K), floor((i+1)·H/K)) of head_split equal the same
  // heads of lse mode with branch i as the only branch (all heads are passed, so offsets h mod r_i are global).
  const std::vector<Case> cases{
      {.batch = 2, .n = 45, .heads = 5, .kv_heads = 5, .segments = {10, 20, 45}, .rates = {1, 2, 3}, .causal = true,
       .padding = true, .seed = 31},
      {.n = 40, .heads = 6, .kv_heads = 2, .segments = {8, 16, 40, 40}, .rates = {4, 8, 2, 1}, .seed = 32},
      {.n = 27, .heads = 3, .kv_heads = 1, .segments = {9}, .rates = {3}, .causal = true, .seed = 33}};  // K = 1
  for (Case c : cases) {
    c.mix = Mix::head_split;
    CAPTURE(c);
    const Problem p = make_problem(c);
    const auto split = longnet::attention::dilated_attention(p.q, p.k, p.v, p.config, p.options);
    const auto branches = static_cast<int64_t>(c.segments.size());
    for (int64_t i = 0; i < branches; ++i) {
      CAPTURE(i);
      DilatedAttentionConfig alone = make_config({c.segments[static_cast<size_t>(i)]},
                                                 {c.rates[static_cast<size_t>(i)]}, c.causal);
      const auto lse_mode = longnet::attention::dilated_attention(p.q, p.k, p.v, alone, p.options);
      const int64_t head0 = i * c.heads / branches, heads = (i + 1) * c.heads / branches - head0;
      CHECK(relative_error(split.out.narrow(2, head0, heads), lse_mode.out.narrow(2, head0, heads)) <= 1e-12);
      CHECK(relative_error(split.lse.narrow(1, head0, heads), lse_mode.lse.narrow(1, head0, heads)) <= 1e-12);
    }
    if (branches == 1) {
      // K = 1: both modes are the same computation.
      DilatedAttentionConfig lse_config = p.config;
      lse_config.mix = Mix::lse;
      const auto lse_mode = longnet::attention::dilated_attention(p.q, p.k, p.v, lse_config, p.options);
      CHECK(relative_error(split.out, lse_mode.out) <= 1e-12);
      CHECK(relative_error(split.lse, lse_mode.lse) <= 1e-12);
    }
  }
}

TEST_CASE("head_split needs at least one head per branch", "[attention][cpu]") {
  const auto q = torch::zeros({1, 16, 2, 8}, torch::kDouble);
  DilatedAttentionConfig config = make_config({4, 8, 16}, {1, 2, 4});
  config.mix = Mix::head_split;
  const std::string message =
      "dilated_attention: mix = head_split needs at least one query head per branch, got H=2 heads for K=3 branches";
  CHECK_THROWS_AS(longnet::attention::dilated_attention(q, q, q, config), longnet::ConfigError);
  CHECK_THROWS_WITH(longnet::attention::dilated_attention(q, q, q, config), message);
  CHECK_THROWS_WITH(config.coverage_warnings(2), message);
  // Three heads are enough; lse mode has no such limit.
  CHECK_NOTHROW(longnet::attention::dilated_attention(torch::zeros({1, 16, 3, 8}, torch::kDouble),
                                                      torch::zeros({1, 16, 3, 8}, torch::kDouble),
                                                      torch::zeros({1, 16, 3, 8}, torch::kDouble), config));
  config.mix = Mix::lse;
  CHECK_NOTHROW(longnet::attention::dilated_attention(q, q, q, config));
}

TEST_CASE("mix names parse and print", "[attention][cpu]") {
  using longnet::attention::parse_mix;
  CHECK(parse_mix("lse") == Mix::lse);
  CHECK(parse_mix("head_split") == Mix::head_split);
  CHECK(longnet::attention::to_string(Mix::lse) == "lse");
  CHECK(longnet::attention::to_string(Mix::head_split) == "head_split");
  CHECK(DilatedAttentionConfig{}.mix == Mix::lse);
  CHECK_THROWS_WITH(parse_mix("split"), "unknown attention mix 'split' (expected lse or head_split)");
}

TEST_CASE("coverage_warnings: with head_split a head is covered by its own branch only", "[attention][cpu]") {
  DilatedAttentionConfig config = make_config({8, 16}, {1, 2});
  // lse: the r = 1 branch covers every position of every head.
  CHECK(config.coverage_warnings(4).empty());
  // head_split: heads 0-1 take (8, 1) and are covered; heads 2-3 take (16, 2) and see every other position.
  config.mix = Mix::head_split;
  CHECK(config.coverage_warnings(4) ==
        std::vector<std::string>{"head 2: 1 of every 2 positions are selected by no branch and output zeros",
                                 "head 3: 1 of every 2 positions are selected by no branch and output zeros"});
  // lse with rates {2, 4} and 1 head: positions 1 and 3 of every 4 are uncovered.
  config = make_config({8, 16}, {2, 4});
  CHECK(config.coverage_warnings(1) ==
        std::vector<std::string>{"head 0: 2 of every 4 positions are selected by no branch and output zeros"});
  // head_split, H = 2: head 0 has r = 2 (offset 0), head 1 has r = 4 (offset 1).
  config.mix = Mix::head_split;
  CHECK(config.coverage_warnings(2) ==
        std::vector<std::string>{"head 0: 1 of every 2 positions are selected by no branch and output zeros",
                                 "head 1: 3 of every 4 positions are selected by no branch and output zeros"});
}

TEST_CASE("relative_position_bucket follows T5", "[attention][cpu]") {
  using longnet::attention::relative_position_bucket;
  // Bidirectional, 32 buckets, max distance 128 (T5's defaults): keys before the query in 0..15, after in 16..31.
  CHECK(relative_position_bucket(0, 32, 128, true) == 0);
  CHECK(relative_position_bucket(-1, 32, 128, true) == 1);
  CHECK(relative_position_bucket(1, 32, 128, true) == 17);
  CHECK(relative_position_bucket(-7, 32, 128, true) == 7);
  CHECK(relative_position_bucket(-12, 32, 128, true) == 9);  // 8 + floor(log(12/8)/log(16)·8) = 8 + 1
  CHECK(relative_position_bucket(12, 32, 128, true) == 25);
  CHECK(relative_position_bucket(-128, 32, 128, true) == 15);
  CHECK(relative_position_bucket(-5000, 32, 128, true) == 15);
  // Causal: keys after the query share bucket 0; 16 exact buckets back.
  CHECK(relative_position_bucket(5, 32, 128, false) == 0);
  CHECK(relative_position_bucket(-5, 32, 128, false) == 5);
  CHECK(relative_position_bucket(-20, 32, 128, false) == 17);  // 16 + floor(log(20/16)/log(8)·16) = 16 + 1
  CHECK(relative_position_bucket(-1000, 32, 128, false) == 31);
}

TEST_CASE("one segment covering the sequence with r = 1 is dense attention", "[attention][cpu]") {
  const bool causal = GENERATE(false, true);
  const int64_t segment = GENERATE(int64_t{40}, int64_t{64});  // w = N and w > N
  CAPTURE(causal, segment);
  Case c{.batch = 2, .n = 40, .heads = 4, .kv_heads = 2, .segments = {segment}, .rates = {1}, .causal = causal,
         .seed = 5};
  const Problem p = make_problem(c);
  const auto got = longnet::attention::dilated_attention(p.q, p.k, p.v, p.config);
  // (B, N, H, D) -> (B, H, N, D)
  const auto q = p.q.transpose(1, 2), k = p.k.transpose(1, 2), v = p.v.transpose(1, 2);
  const auto dense = at::scaled_dot_product_attention(q, k, v, {}, 0.0, causal, {}, /*enable_gqa=*/true);
  CHECK(relative_error(got.out, dense.transpose(1, 2)) <= 1e-12);

  auto scores = torch::matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) / std::sqrt(16.0);
  if (causal) scores = scores.masked_fill(torch::ones({40, 40}, torch::kBool).triu(1), -kInf);
  CHECK(relative_error(got.lse, torch::logsumexp(scores, -1)) <= 1e-12);

  SECTION("the same branch twice counts every key twice: same output, lse + log 2") {
    const auto twice = longnet::attention::dilated_attention(p.q, p.k, p.v, make_config({segment, segment}, {1, 1},
                                                                                        causal));
    CHECK(relative_error(twice.out, got.out) <= 1e-12);
    CHECK(relative_error(twice.lse, got.lse + std::log(2.0)) <= 1e-12);
  }
}

TEST_CASE("branch order does not change the result", "[attention][cpu]") {
  Case c{.batch = 2, .n = 70, .heads = 5, .kv_heads = 5, .segments = {8, 16, 32, 70}, .rates = {1, 2, 4, 7},
         .causal = true, .padding = true, .seed = 11};
  const Problem p = make_problem(c);
  const auto forward = longnet::attention::dilated_attention(p.q, p.k, p.v, p.config, p.options);
  const auto backward = longnet::attention::dilated_attention(
      p.q, p.k, p.v, make_config({70, 16, 8, 32}, {7, 2, 1, 4}, true), p.options);
  CHECK(relative_error(backward.out, forward.out) <= 1e-12);
  CHECK(relative_error(backward.lse, forward.lse) <= 1e-12);
}

TEST_CASE("combine_by_lse is commutative and associative, -inf included", "[attention][cpu]") {
  using longnet::attention::combine_by_lse;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  std::vector<AttentionResult> parts;
  for (int i = 0; i < 3; ++i) {
    auto lse = at::randn({2, 3, 10}, gen, f64) * 3;  // (B, H, N)
    // Some queries have no keys in this part (and query 0 in none of them).
    lse = lse.masked_fill(at::rand({2, 3, 10}, gen, f64) < 0.3, -kInf);
    lse.select(2, 0).fill_(-kInf);
    auto out = at::randn({2, 10, 3, 4}, gen, f64).masked_fill(torch::isinf(lse).permute({0, 2, 1}).unsqueeze(-1), 0.0);
    parts.push_back({out, lse});
  }
  const auto& [a, b, c] = std::tie(parts[0], parts[1], parts[2]);
  const auto ab = combine_by_lse(a.out, a.lse, b.out, b.lse);
  const auto ba = combine_by_lse(b.out, b.lse, a.out, a.lse);
  CHECK(relative_error(ab.out, ba.out) <= 1e-14);
  CHECK(relative_error(ab.lse, ba.lse) <= 1e-14);
  const auto left = combine_by_lse(ab.out, ab.lse, c.out, c.lse);
  const auto bc = combine_by_lse(b.out, b.lse, c.out, c.lse);
  const auto right = combine_by_lse(a.out, a.lse, bc.out, bc.lse);
  CHECK(relative_error(left.out, right.out) <= 1e-12);
  CHECK(relative_error(left.lse, right.lse) <= 1e-12);
  CHECK(torch::isneginf(left.lse.select(2, 0)).all().item<bool>());
  CHECK(torch::equal(left.out.select(1, 0), torch::zeros({2, 3, 4}, f64)));
  // Against the definition: lse = log Σ e^lse_i, out = Σ e^(lse_i - lse)·out_i.
  const auto lse = torch::logsumexp(torch::stack({a.lse, b.lse, c.lse}), 0);
  CHECK(relative_error(left.lse, lse) <= 1e-12);
}

TEST_CASE("causal outputs ignore future tokens", "[attention][cpu]") {
  Case c{.batch = 2, .n = 48, .heads = 3, .kv_heads = 3, .segments = {8, 16, 48}, .rates = {1, 2, 4},
         .causal = true, .bias = true, .bidirectional_bias = false, .seed = 17};
  const int64_t t = GENERATE(int64_t{0}, int64_t{13}, int64_t{31});
  CAPTURE(t);
  const Problem p = make_problem(c);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(99);
  const auto perturb = [&](const at::Tensor& x) {
    auto y = x.clone();
    y.narrow(1, t + 1, c.n - t - 1).copy_(at::randn(y.narrow(1, t + 1, c.n - t - 1).sizes(), gen, y.options()));
    return y;
  };
  const auto before = longnet::attention::dilated_attention(p.q, p.k, p.v, p.config, p.options);
  const auto after =
      longnet::attention::dilated_attention(perturb(p.q), perturb(p.k), perturb(p.v), p.config, p.options);
  CHECK(torch::equal(after.out.narrow(1, 0, t + 1), before.out.narrow(1, 0, t + 1)));
  CHECK(torch::equal(after.lse.narrow(2, 0, t + 1), before.lse.narrow(2, 0, t + 1)));
  CHECK_FALSE(torch::equal(after.out.narrow(1, t + 1, 1), before.out.narrow(1, t + 1, 1)));
}

TEST_CASE("padding does not change valid positions", "[attention][cpu]") {
  const bool causal = GENERATE(false, true);
  CAPTURE(causal);
  const int64_t n = 50, valid = 37;
  Case c{.batch = 1, .n = n, .heads = 4, .kv_heads = 2, .segments = {8, 16, 64}, .rates = {1, 2, 4},
         .causal = causal, .bias = true, .bidirectional_bias = !causal, .seed = 23};
  const Problem p = make_problem(c);
  AttentionOptions options = p.options;
  options.key_padding_mask = torch::arange(n).ge(valid).unsqueeze(0);  // (1, N): the tail is padding
  const auto padded = longnet::attention::dilated_attention(p.q, p.k, p.v, p.config, options);

  SECTION("equals the unpadded sequence") {
    const auto short_run = longnet::attention::dilated_attention(p.q.narrow(1, 0, valid), p.k.narrow(1, 0, valid),
                                                                 p.v.narrow(1, 0, valid), p.config, p.options);
    CHECK(relative_error(padded.out.narrow(1, 0, valid), short_run.out) <= 1e-12);
    CHECK(relative_error(padded.lse.narrow(2, 0, valid), short_run.lse) <= 1e-12);
  }
  SECTION("ignores the values at padded positions") {
    const auto scramble = [&](const at::Tensor& x) {
      auto y = x.clone();
      y.narrow(1, valid, n - valid).fill_(1e6);
      return y;
    };
    const auto other = longnet::attention::dilated_attention(scramble(p.q), scramble(p.k), scramble(p.v), p.config,
                                                             options);
    CHECK(torch::equal(other.out.narrow(1, 0, valid), padded.out.narrow(1, 0, valid)));
  }
}

TEST_CASE("queries without keys output zeros with finite gradients", "[attention][cpu]") {
  // H = 2, one branch (8, 4): head 0 selects rows 0 and 4 of each segment, head 1 rows 1 and 5; the rest output 0.
  Case c{.batch = 2, .n = 20, .heads = 2, .kv_heads = 2, .segments = {8}, .rates = {4}, .causal = true, .seed = 31};
  Problem p = make_problem(c);
  auto mask = torch::zeros({2, 20}, torch::kBool);
  mask[0].fill_(true);          // sample 0: every key is padding
  mask[1][0] = true;            // sample 1: query 0 of head 0 sees only key 0, which is padding
  p.options.key_padding_mask = mask;
  const auto [g_out, g_lse] = upstream(p, 1);
  const auto got = evaluate(run_public, p, g_out, g_lse);
  const auto want = evaluate(oracle_dilated_attention, p, g_out, g_lse);

  const auto zero_rows = torch::ones({2, 20, 2}, torch::kBool);  // (B, N, H): queries without any key
  for (int64_t pos = 0; pos < 20; ++pos) {
    for (int64_t h = 0; h < 2; ++h) {
      if ((pos % 8) % 4 == h && !(pos == 0 && h == 0)) zero_rows[1][pos][h] = false;
    }
  }
  CHECK(torch::equal(got.result.out.masked_select(zero_rows.unsqueeze(-1)),
                     torch::zeros({zero_rows.sum().item<int64_t>() * 16}, torch::kDouble)));
  CHECK(torch::equal(torch::isneginf(got.result.lse), zero_rows.permute({0, 2, 1})));
  for (const auto& g : {got.dq, got.dk, got.dv}) CHECK(torch::isfinite(g).all().item<bool>());
  CHECK(torch::equal(got.dq.masked_select(zero_rows.unsqueeze(-1)),
                     torch::zeros({zero_rows.sum().item<int64_t>() * 16}, torch::kDouble)));
  CHECK(relative_error(got.dq, want.dq) <= 1e-10);
  CHECK(relative_error(got.dk, want.dk) <= 1e-10);
  CHECK(relative_error(got.dv, want.dv) <= 1e-10);
}

TEST_CASE("reference gradients match central differences", "[attention][cpu]") {
  Case c{.batch = 1, .n = 7, .heads = 2, .kv_heads = 1, .head_dim = 3, .segments = {2, 6}, .rates = {1, 2},
         .causal = true, .padding = true, .bias = true, .bidirectional_bias = false, .seed = 41};
  Problem p = make_problem(c);
  const auto [g_out, g_lse] = upstream(p, 2);
  const auto loss = [&](const Problem& x) {
    const auto r = longnet::attention::dilated_attention(x.q, x.k, x.v, x.config, x.options);
    return ((r.out * g_out).sum() + (r.lse.masked_fill(torch::isinf(r.lse), 0.0) * g_lse).sum()).item<double>();
  };
  const auto analytic = evaluate(run_public, p, g_out, g_lse);
  std::vector<std::pair<at::Tensor, at::Tensor>> checks{
      {p.q, analytic.dq}, {p.k, analytic.dk}, {p.v, analytic.dv}, {p.options.relative_bias->table, analytic.dtable}};
  constexpr double eps = 1e-6;
  for (auto& [x, grad] : checks) {
    const auto flat = x.view(-1);  // writes through to the problem's tensor
    const auto numeric = torch::zeros_like(flat);
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const double saved = flat[i].item<double>();
      flat[i] = saved + eps;
      const double up = loss(p);
      flat[i] = saved - eps;
      const double down = loss(p);
      flat[i] = saved;
      numeric[i] = (up - down) / (2 * eps);
    }
    CHECK(torch::allclose(grad.reshape(-1), numeric, /*rtol=*/1e-6, /*atol=*/1e-7));
  }
}

TEST_CASE("backend resolution", "[attention][cpu]") {
  using longnet::attention::resolve_backend;
  const auto q = torch::zeros({1, 8, 2, 16});
  DilatedAttentionConfig config = make_config({8}, {1});
  // `auto` takes flash only for CUDA bfloat16/float16 inputs without a relative bias.
  CHECK(resolve_backend(q, config, {}) == Backend::reference);
  CHECK(resolve_backend(q.to(torch::kBFloat16), config, {}) == Backend::reference);
  config.backend = Backend::reference;
  CHECK(resolve_backend(q, config, {}) == Backend::reference);
  config.backend = Backend::flash;
  CHECK(resolve_backend(q, config, {}) == Backend::flash);
  // Explicit flash on CPU inputs is an error, not a quiet switch to the reference.
  CHECK_THROWS_AS(longnet::attention::dilated_attention(q, q, q, config), longnet::ConfigError);
  CHECK_THROWS_WITH(longnet::attention::dilated_attention(q, q, q, config),
                    Catch::StartsWith("dilated_attention: the flash backend cannot run these inputs: "));
}

// The packed entry point off the fused backend: split_qkv, then dilated_attention. Against the float64 oracle on the
// split and rotated slots, forward and the gradient of the packed projection (the CUDA path has its GPU test).
TEST_CASE("dilated_attention_packed matches the oracle on split_qkv's slots, forward and gradient", "[attention][cpu]") {
  const int position = GENERATE(0, 1, 2);  // none, rope, xpos
  const int64_t kv_heads = GENERATE(int64_t{3}, int64_t{1});
  CAPTURE(position, kv_heads);
  torch::manual_seed(40 + position);
  const int64_t B = 2, N = 40, H = 3, D = 8;
  const auto positions = torch::arange(N, torch::kLong);
  longnet::attention::QkvRotation rotation;
  if (position > 0) std::tie(rotation.cos, rotation.sin) = longnet::attention::rotary_cos_sin(positions, D, 1e4);
  if (position == 2) {
    rotation.q_scale = longnet::attention::xpos_scale(positions - N / 2, D, 64.0);
    rotation.k_scale = longnet::attention::xpos_scale(N / 2 - positions, D, 64.0);
  }
  DilatedAttentionConfig config = make_config({8, 16}, {1, 2});
  config.causal = true;
  AttentionOptions options;
  options.key_padding_mask = torch::zeros({B, N}, torch::kBool);
  options.key_padding_mask->narrow(1, N - 5, 5).fill_(true);
  const auto x = torch::randn({B, N, (H + 2 * kv_heads) * D}, torch::kDouble).requires_grad_();
  const auto dout = torch::randn({B, N, H, D}, torch::kDouble);
  const auto packed = longnet::attention::dilated_attention_packed(x, H, kv_heads, rotation, config, options);
  packed.out.backward(dout);

  const auto x64 = x.detach().clone().requires_grad_();
  const auto split = longnet::attention::split_qkv(x64, H, kv_heads, rotation.cos, rotation.sin, rotation.q_scale,
                                                   rotation.k_scale);
  const auto oracle = oracle_dilated_attention(split.q, split.k, split.v, config, options);
  oracle.out.backward(dout);
  CHECK(relative_error(packed.out, oracle.out) <= relative_tolerance(at::kDouble));
  CHECK(relative_error(packed.lse, oracle.lse) <= relative_tolerance(at::kDouble));
  CHECK(relative_error(x.grad(), x64.grad()) <= relative_tolerance(at::kDouble));
  // Shapes the split cannot take are named.
  CHECK_THROWS_WITH(longnet::attention::dilated_attention_packed(x.detach().narrow(2, 0, 7), H, kv_heads, rotation,
                                                                 config, options),
                    Catch::Contains("split_qkv"));
}

TEST_CASE("head_split picks its backend as lse does", "[attention][cpu]") {
  using longnet::attention::resolve_backend;
  const auto q = torch::zeros({1, 8, 2, 16});
  DilatedAttentionConfig config = make_config({4, 8}, {1, 2});
  config.mix = Mix::head_split;
  // `auto` on CPU tensors is the reference (flash would need CUDA bf16/fp16 inputs).
  CHECK(resolve_backend(q, config, {}) == Backend::reference);
  CHECK(resolve_backend(q.to(torch::kBFloat16), config, {}) == Backend::reference);
  CHECK_NOTHROW(longnet::attention::dilated_attention(q, q, q, config));
  // An explicit flash is honoured, and refused for these CPU inputs with the reason.
  config.backend = Backend::flash;
  CHECK(resolve_backend(q, config, {}) == Backend::flash);
  CHECK_THROWS_AS(longnet::attention::dilated_attention(q, q, q, config), longnet::ConfigError);
}

TEST_CASE("forward_flops counts each branch's heads: all of them with lse, its group with head_split",
          "[attention][cpu]") {
  // N = 64, w = {16, 32}, r = {1, 2}: per head, branch 0 costs 4 segments × 16² and branch 1 2 segments × 16².
  DilatedAttentionConfig config = make_config({16, 32}, {1, 2});
  const double per_head_0 = 4.0 * 16 * 16, per_head_1 = 2.0 * 16 * 16, scale = 4.0 * 8;  // 4·D, D = 8
  CHECK(config.forward_flops(1, 64, 5, 8) == Approx((per_head_0 + per_head_1) * 5 * scale));
  config.mix = Mix::head_split;  // H = 5, K = 2: groups [0, 2) and [2, 5)
  CHECK(config.forward_flops(1, 64, 5, 8) == Approx((per_head_0 * 2 + per_head_1 * 3) * scale));
  // A ragged tail counts its own rows: N = 40 → branch 0: 2 × 16² + 8², branch 1: 1 × 16² + 4².
  CHECK(config.forward_flops(2, 40, 5, 8) == Approx(2 * ((2 * 256.0 + 64) * 2 + (256.0 + 16) * 3) * scale));
}

TEST_CASE("bad inputs name the argument and the expected shape", "[attention][cpu]") {
  using longnet::attention::dilated_attention;
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const auto q = torch::zeros({2, 16, 4, 8}, opts), kv = torch::zeros({2, 16, 2, 8}, opts);
  const auto config = make_config({8}, {2});

  CHECK_THROWS_WITH(dilated_attention(torch::zeros({2, 16, 4}, opts), kv, kv, config),
                    "dilated_attention: q must have shape (B, N, H, D), got [2, 16, 4]");
  CHECK_THROWS_WITH(dilated_attention(q, torch::zeros({2, 15, 2, 8}, opts), kv, config),
                    "dilated_attention: k must have shape (B=2, N=16, Hkv, D=8) to match q [2, 16, 4, 8], got "
                    "[2, 15, 2, 8]");
  CHECK_THROWS_WITH(dilated_attention(q, kv, torch::zeros({2, 16, 2, 4}, opts), config),
                    "dilated_attention: v must have shape (B=2, N=16, Hkv, D=8) to match q [2, 16, 4, 8], got "
                    "[2, 16, 2, 4]");
  CHECK_THROWS_WITH(dilated_attention(q, kv, torch::zeros({2, 16, 1, 8}, opts), config),
                    "dilated_attention: v must have the shape of k [2, 16, 2, 8], got [2, 16, 1, 8]");
  CHECK_THROWS_WITH(dilated_attention(q, torch::zeros({2, 16, 3, 8}, opts), torch::zeros({2, 16, 3, 8}, opts), config),
                    "dilated_attention: the query heads H=4 must be a multiple of the key/value heads Hkv=3 "
                    "(q [2, 16, 4, 8], k [2, 16, 3, 8])");
  CHECK_THROWS_WITH(dilated_attention(q, kv.to(torch::kFloat), kv, config),
                    "dilated_attention: k has dtype Float but q has Double (q, k and v must share one dtype)");
  CHECK_THROWS_WITH(dilated_attention(q.to(torch::kLong), kv.to(torch::kLong), kv.to(torch::kLong), config),
                    "dilated_attention: q must be a floating tensor, got Long");

  AttentionOptions options;
  options.key_padding_mask = torch::zeros({2, 17}, torch::kBool);
  CHECK_THROWS_WITH(dilated_attention(q, kv, kv, config, options),
                    "dilated_attention: key_padding_mask must have shape (B=2, N=16) bool, got [2, 17] Bool");
  options.key_padding_mask = torch::zeros({2, 16}, torch::kFloat);
  CHECK_THROWS_WITH(dilated_attention(q, kv, kv, config, options),
                    "dilated_attention: key_padding_mask must have shape (B=2, N=16) bool, got [2, 16] Float");

  AttentionOptions bias_options;
  bias_options.relative_bias = RelativePositionBias{.table = torch::zeros({3, 32}, opts)};
  CHECK_THROWS_WITH(dilated_attention(q, kv, kv, config, bias_options),
                    "dilated_attention: relative_bias.table must have shape (H=4, num_buckets=32), got [3, 32]");
  bias_options.relative_bias = RelativePositionBias{.table = torch::zeros({4, 2}, opts), .num_buckets = 2};
  CHECK_THROWS_WITH(dilated_attention(q, kv, kv, config, bias_options),
                    "dilated_attention: relative_bias.num_buckets must be >= 4 when bidirectional, got 2");
  bias_options.relative_bias = RelativePositionBias{.table = torch::zeros({4, 32}, opts), .max_distance = 8};
  CHECK_THROWS_WITH(dilated_attention(q, kv, kv, config, bias_options),
                    "dilated_attention: relative_bias.max_distance must exceed the 8 exact buckets, got 8");

  CHECK_THROWS_AS(dilated_attention(q, kv, kv, make_config({8}, {3})), longnet::ConfigError);
  CHECK_THROWS_WITH(dilated_attention(q, kv, kv, make_config({8}, {3})),
                    "dilation_rates[0] = 3 must divide segment_lengths[0] = 8");
  CHECK_THROWS_WITH(dilated_attention(q, kv, kv, make_config({8, 16}, {1})),
                    Catch::Contains("one dilation rate per segment length"));
  CHECK_THROWS_WITH(dilated_attention(q, kv, kv, make_config({}, {})), Catch::Contains("at least one branch"));
  CHECK_THROWS_WITH(dilated_attention(q, kv, kv, make_config({0}, {1})),
                    "segment_lengths[0] must be >= 1, got 0");
}
