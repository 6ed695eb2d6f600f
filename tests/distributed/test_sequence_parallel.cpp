// Sequence-parallel dilated attention in float64 with Gloo: every rank's output, LSE and the gradients of its q, k
// and v rows equal those rows of the single-process dilated_attention (reference backend) on the whole sequence, for
// uneven splits, causal attention, key padding, grouped kv heads and segments that span ranks partially; plus the
// split rule and the communication volume.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "attention/dilated_attention.h"
#include "core/error.h"
#include "distributed/sequence_parallel.h"
#include "tests/distributed/world.h"
#include "tests/support/single_threaded.h"

#include <catch2/catch.hpp>

using namespace longnet;
using namespace longnet::distributed;
using attention::DilatedAttentionConfig;

namespace {

constexpr double kTol = 1e-10;

// max |a - b| / max(1, max |b|), with -inf (a query without keys) required at the same places in both.
double relative_error(const at::Tensor& actual, const at::Tensor& expected) {
  const auto a_inf = at::isinf(actual), e_inf = at::isinf(expected);
  if (!at::equal(a_inf, e_inf)) return 1e300;
  const auto a = actual.masked_fill(a_inf, 0.0), e = expected.masked_fill(e_inf, 0.0);
  const double scale = std::max(1.0, e.abs().max().item<double>());
  return (a - e).abs().max().item<double>() / scale;
}

struct Case {
  std::string name;
  int64_t n = 37, batch = 2, heads = 4, kv_heads = 4, head_dim = 8;
  std::vector<int64_t> segments{4, 8, 16, 64};
  std::vector<int64_t> rates{1, 2, 4, 8};
  bool causal = false;
  bool padding = false;
};

struct Errors {
  double out = 0, lse = 0, dq = 0, dk = 0, dv = 0;
  CommStats stats;
};

// Runs `c` on the whole sequence in this process and split across `group`, and compares this rank's rows.
Errors compare(const Case& c, const ProcessGroup& group) {
  DilatedAttentionConfig config{.segment_lengths = c.segments, .dilation_rates = c.rates, .causal = c.causal,
                                .backend = attention::Backend::reference};
  torch::manual_seed(20240);  // the same tensors on every rank
  const auto f64 = torch::dtype(torch::kDouble);
  const auto q = torch::randn({c.batch, c.n, c.heads, c.head_dim}, f64);
  const auto k = torch::randn({c.batch, c.n, c.kv_heads, c.head_dim}, f64);
  const auto v = torch::randn({c.batch, c.n, c.kv_heads, c.head_dim}, f64);
  const auto w_out = torch::randn({c.batch, c.n, c.heads, c.head_dim}, f64);
  const auto w_lse = torch::randn({c.batch, c.heads, c.n}, f64);
  attention::AttentionOptions full_options;
  if (c.padding) {
    auto mask = torch::rand({c.batch, c.n}, f64) < 0.25;
    mask.select(0, 0).narrow(0, c.n - 5, 5).fill_(true);  // a padded tail, as batches of short samples have
    full_options.key_padding_mask = mask;
  }
  // Loss through both outputs; LSE entries of queries without keys (-inf) are left out.
  auto loss_of = [](const attention::AttentionResult& r, const at::Tensor& wo, const at::Tensor& wl) {
    return (r.out * wo).sum() + (r.lse.masked_fill(at::isinf(r.lse), 0.0) * wl).sum();
  };

  const auto qf = q.clone().requires_grad_(), kf = k.clone().requires_grad_(), vf = v.clone().requires_grad_();
  const auto full = attention::dilated_attention(qf, kf, vf, config, full_options);
  loss_of(full, w_out, w_lse).backward();

  const SequencePart part = sequence_part(c.n, group.size(), group.rank());
  auto rows = [&](const at::Tensor& t, int64_t dim) { return t.narrow(dim, part.start, part.length); };
  const auto ql = rows(q, 1).clone().requires_grad_(), kl = rows(k, 1).clone().requires_grad_(),
             vl = rows(v, 1).clone().requires_grad_();
  attention::AttentionOptions options;
  if (full_options.key_padding_mask) options.key_padding_mask = rows(*full_options.key_padding_mask, 1).clone();
  Errors e;
  const auto local = sequence_parallel_dilated_attention(ql, kl, vl, config, options, group, c.n, &e.stats);
  loss_of(local, rows(w_out, 1), rows(w_lse, 2)).backward();

  e.out = relative_error(local.out, rows(full.out, 1));
  e.lse = relative_error(local.lse, rows(full.lse, 2));
  e.dq = relative_error(ql.grad(), rows(qf.grad(), 1));
  e.dk = relative_error(kl.grad(), rows(kf.grad(), 1));
  e.dv = relative_error(vl.grad(), rows(vf.grad(), 1));
  return e;
}

void check_case(const Case& c, const ProcessGroup& group) {
  const Errors e = compare(c, group);
  INFO(c.name << " on rank " << group.rank() << " of " << group.size());
  CHECK(e.out <= kTol);
  CHECK(e.lse <= kTol);
  CHECK(e.dq <= kTol);
  CHECK(e.dk <= kTol);
  CHECK(e.dv <= kTol);
}

}  // namespace

TEST_CASE("sequence_part splits contiguously, the first N mod P parts one longer") {
  CHECK(sequence_part(10, 4, 0).start == 0);
  CHECK(sequence_part(10, 4, 0).length == 3);
  CHECK(sequence_part(10, 4, 1).start == 3);
  CHECK(sequence_part(10, 4, 1).length == 3);
  CHECK(sequence_part(10, 4, 2).start == 6);
  CHECK(sequence_part(10, 4, 2).length == 2);
  CHECK(sequence_part(10, 4, 3).start == 8);
  CHECK(sequence_part(10, 4, 3).length == 2);
  CHECK(sequence_part(8, 1, 0).length == 8);
}

TEST_CASE("branch_spans_ranks: local only when every part starts and ends on segment boundaries") {
  CHECK_FALSE(branch_spans_ranks(32, 4, 8));   // parts of 8
  CHECK_FALSE(branch_spans_ranks(32, 4, 4));
  CHECK(branch_spans_ranks(32, 4, 16));        // a segment of 16 covers two parts
  CHECK(branch_spans_ranks(37, 4, 4));         // parts 10, 9, 9, 9: boundaries off the multiples of 4
  CHECK_FALSE(branch_spans_ranks(36, 4, 9));   // parts of 9
  CHECK_FALSE(branch_spans_ranks(35, 2, 6));   // parts 18, 17: the second ends at N (ragged last segment)
  CHECK_FALSE(branch_spans_ranks(37, 1, 64));  // one rank
}

TEST_CASE("sequence parallel equals single-process dilated attention: uneven split, spanning segments") {
  check_case({.name = "uneven"}, longnet::test::world().group);
}

TEST_CASE("sequence parallel in chunks of slots equals single-process dilated attention") {
  // LONGNET_SP_SCORE_ELEMENTS = 1: every spanning branch attends and differentiates one slot per call.
  setenv("LONGNET_SP_SCORE_ELEMENTS", "1", 1);
  check_case({.name = "chunked, causal padding", .kv_heads = 2, .causal = true, .padding = true},
             longnet::test::world().group);
  unsetenv("LONGNET_SP_SCORE_ELEMENTS");
}

TEST_CASE("sequence parallel equals single-process dilated attention: causal") {
  check_case({.name = "causal", .causal = true}, longnet::test::world().group);
}

TEST_CASE("sequence parallel equals single-process dilated attention: key padding and grouped kv heads") {
  check_case({.name = "padding", .kv_heads = 2, .padding = true}, longnet::test::world().group);
  check_case({.name = "causal padding", .kv_heads = 1, .causal = true, .padding = true}, longnet::test::world().group);
}

TEST_CASE("sequence parallel equals single-process dilated attention: local and spanning branches mixed") {
  // N = 32: with 2 or 4 ranks the segments of 8 stay inside a part; those of 16 and 32 span parts.
  check_case({.name = "mixed", .n = 32, .segments = {8, 16, 32}, .rates = {1, 2, 4}, .causal = true},
             longnet::test::world().group);
  // Rates above the head count (offsets without heads) and a segment longer than the sequence.
  check_case({.name = "sparse", .n = 29, .heads = 3, .kv_heads = 3, .segments = {6, 24, 48}, .rates = {1, 6, 8}},
             longnet::test::world().group);
}

TEST_CASE("sequence parallel communicates only dilated rows of spanning branches") {
  const auto& group = longnet::test::world().group;
  const int64_t P = group.size();
  // Only local branches: no bytes move.
  const Errors local = compare({.name = "local", .n = 32, .segments = {8}, .rates = {2}}, group);
  CHECK(local.out <= kTol);
  CHECK(local.dk <= kTol);
  CHECK(local.stats.bytes_received == 0);
  // One branch spanning all ranks (P > 1): forward all-gather plus backward reduce-scatter, each
  // (P - 1) · B · ceil(max_p n_p / r) · H · (2D + 1) float64 elements.
  const Case c{.name = "global", .n = 64, .segments = {64}, .rates = {4}};
  const Errors global = compare(c, group);
  CHECK(global.out <= kTol);
  CHECK(global.dv <= kTol);
  const int64_t rows = (sequence_part(c.n, P, 0).length + 3) / 4;
  const int64_t per_direction = (P - 1) * c.batch * rows * c.heads * (2 * c.head_dim + 1) * 8;
  CHECK(global.stats.bytes_received == 2 * per_direction);
  CHECK(global.stats.bytes_sent == 2 * per_direction);
}

TEST_CASE("sequence parallel over sequence groups of a split world") {
  // Sequence groups of 2 ranks when the world has an even size (two independent sequences in a world of 4).
  const int world_size = longnet::test::world().size;
  const int sequence_size = world_size % 2 == 0 ? 2 : 1;
  const auto groups = longnet::test::split_world("sp", sequence_size);
  CHECK(groups.sequence.size() == sequence_size);
  CHECK(groups.data.size() == world_size / sequence_size);
  check_case({.name = "split", .n = 21, .causal = true, .padding = true}, groups.sequence);
}

TEST_CASE("sequence parallel rejects a part of the wrong length and unsupported options") {
  const auto& group = longnet::test::world().group;
  const auto f64 = torch::dtype(torch::kDouble);
  const SequencePart part = sequence_part(16, group.size(), group.rank());
  const auto wrong = torch::randn({1, part.length + 1, 2, 4}, f64);
  DilatedAttentionConfig config{.segment_lengths = {16}, .dilation_rates = {1}};
  CHECK_THROWS_WITH(sequence_parallel_dilated_attention(wrong, wrong, wrong, config, {}, group, 16),
                    Catch::Contains("holds rows"));
  const auto ok = torch::randn({1, part.length, 2, 4}, f64);
  config.mix = attention::Mix::head_split;
  config.segment_lengths = {16, 8};
  config.dilation_rates = {1, 1};
  CHECK_THROWS_AS(sequence_parallel_dilated_attention(ok, ok, ok, config, {}, group, 16), ConfigError);
}
