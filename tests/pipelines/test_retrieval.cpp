// Retrieval metrics (pipelines/retrieval.h) against a brute-force count, in both directions with several captions per
// item, with ties, and whatever the chunk size.
#include <algorithm>
#include <limits>
#include <map>

#include <torch/torch.h>

#include "core/error.h"
#include "pipelines/retrieval.h"

#include <catch2/catch.hpp>

using longnet::pipelines::retrieval_metrics;

namespace {

// Rank by the definition: 1 + other items whose best row scores >= the true item's best row.
std::vector<int64_t> brute_force_ranks(const at::Tensor& q, const at::Tensor& qi, const at::Tensor& g,
                                       const at::Tensor& gi) {
  std::vector<int64_t> ranks;
  for (int64_t a = 0; a < q.size(0); ++a) {
    std::map<int64_t, double> best;
    for (int64_t b = 0; b < g.size(0); ++b) {
      const double s = q[a].dot(g[b]).item<double>();
      const int64_t item = gi[b].item<int64_t>();
      if (!best.count(item) || s > best[item]) best[item] = s;
    }
    const double own = best.at(qi[a].item<int64_t>());
    int64_t rank = 1;
    for (const auto& [item, s] : best) {
      if (item != qi[a].item<int64_t>() && s >= own) ++rank;
    }
    ranks.push_back(rank);
  }
  return ranks;
}

}  // namespace

TEST_CASE("retrieval ranks match a brute-force count in both directions", "[pipelines]") {
  torch::manual_seed(4);
  const int64_t videos = 23, captions_per_video = 3, E = 8;
  // Captions are noisy copies of their video's embedding, so ranks spread between 1 and the gallery size.
  const auto video = torch::nn::functional::normalize(torch::randn({videos, E}, torch::kDouble),
                                                      torch::nn::functional::NormalizeFuncOptions().dim(1));
  const auto caption_item = torch::arange(videos, torch::kLong).repeat_interleave(captions_per_video);
  const auto caption = video.index_select(0, caption_item) + 0.9 * torch::randn({videos * captions_per_video, E},
                                                                                torch::kDouble);
  const auto video_item = torch::arange(videos, torch::kLong) * 10 + 7;  // any ids
  const auto caption_ids = caption_item * 10 + 7;

  for (const int64_t chunk : {int64_t{0}, int64_t{1}, int64_t{5}}) {
    CAPTURE(chunk);
    const auto t2v = retrieval_metrics(caption, caption_ids, video, video_item, chunk);
    CHECK(t2v.ranks == brute_force_ranks(caption, caption_ids, video, video_item));
    CHECK(t2v.queries == videos * captions_per_video);
    CHECK(t2v.gallery_items == videos);
    const auto v2t = retrieval_metrics(video, video_item, caption, caption_ids, chunk);
    CHECK(v2t.ranks == brute_force_ranks(video, video_item, caption, caption_ids));
    CHECK(v2t.gallery_items == videos);
  }
  const auto r = retrieval_metrics(caption, caption_ids, video, video_item);
  const auto ranks = r.ranks;
  auto pct = [&](int64_t k) {
    return 100.0 * static_cast<double>(std::count_if(ranks.begin(), ranks.end(), [k](int64_t x) { return x <= k; })) /
           static_cast<double>(ranks.size());
  };
  CHECK(r.r1 == Approx(pct(1)));
  CHECK(r.r5 == Approx(pct(5)));
  CHECK(r.r10 == Approx(pct(10)));
  CHECK(r.r1 > 100.0 / videos);  // the noisy copies are retrieved far better than chance
  CHECK(r.r1 < 100.0);           // and not trivially
  std::vector<int64_t> sorted = ranks;
  std::sort(sorted.begin(), sorted.end());
  CHECK(r.median_rank == Approx(static_cast<double>(sorted[sorted.size() / 2])));  // 69 queries: the middle one
  CHECK_THAT(r.protocol, Catch::Contains("69 queries against 23 items"));
}

TEST_CASE("retrieval counts ties against the query", "[pipelines]") {
  const auto same = torch::ones({5, 4});
  const auto items = torch::arange(5, torch::kLong);
  const auto r = retrieval_metrics(same, items, same, items);
  CHECK(r.ranks == std::vector<int64_t>(5, 5));  // every item ties with every other: the worst rank
  CHECK(r.r1 == 0.0);
  CHECK(r.mean_rank == 5.0);
}

TEST_CASE("retrieval rejects mismatched inputs and queries without their item", "[pipelines]") {
  const auto g = torch::randn({4, 3});
  const auto gi = torch::arange(4, torch::kLong);
  CHECK_THROWS_AS(retrieval_metrics(torch::randn({2, 5}), torch::zeros({2}, torch::kLong), g, gi),
                  longnet::DataError);
  CHECK_THROWS_WITH(retrieval_metrics(torch::randn({2, 3}), torch::tensor({1, 9}, torch::kLong), g, gi),
                    "retrieval: query 1 belongs to item 9, which has no row in the gallery");
  auto bad = torch::randn({2, 3});
  bad[0][0] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(retrieval_metrics(bad, torch::tensor({1, 2}, torch::kLong), g, gi), Catch::Contains("NaN"));
}
