#include "pipelines/retrieval.h"

#include <algorithm>
#include <limits>
#include <map>
#include <numeric>

#include <torch/torch.h>

#include "core/error.h"

namespace longnet::pipelines {
namespace {

std::string shape(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + ")";
}

}  // namespace

double RetrievalResult::recall_at(int64_t k) const {
  if (ranks.empty()) return 0.0;
  const auto hits = std::count_if(ranks.begin(), ranks.end(), [k](int64_t r) { return r <= k; });
  return 100.0 * static_cast<double>(hits) / static_cast<double>(ranks.size());
}

RetrievalResult retrieval_metrics(const at::Tensor& queries, const at::Tensor& query_items, const at::Tensor& gallery,
                                  const at::Tensor& gallery_items, int64_t chunk) {
  auto expect = [](bool ok, const std::string& message) {
    if (!ok) throw DataError("retrieval: " + message);
  };
  expect(queries.dim() == 2 && gallery.dim() == 2 && queries.size(1) == gallery.size(1),
         "queries (Q, E) and gallery (G, E) must share E, got " + shape(queries) + " and " + shape(gallery));
  expect(query_items.dim() == 1 && query_items.size(0) == queries.size(0),
         "query_items must be (Q) = (" + std::to_string(queries.size(0)) + "), got " + shape(query_items));
  expect(gallery_items.dim() == 1 && gallery_items.size(0) == gallery.size(0),
         "gallery_items must be (G) = (" + std::to_string(gallery.size(0)) + "), got " + shape(gallery_items));
  expect(gallery.size(0) > 0, "the gallery is empty");
  expect(torch::isfinite(queries).all().item<bool>() && torch::isfinite(gallery).all().item<bool>(),
         "embeddings hold NaN or infinity");

  // Item ids → 0..I-1.
  const auto g_ids = gallery_items.to(torch::kCPU, torch::kLong).contiguous();
  std::map<int64_t, int64_t> compact;
  for (int64_t i = 0; i < g_ids.size(0); ++i) compact.emplace(g_ids[i].item<int64_t>(), 0);
  int64_t next = 0;
  for (auto& [id, index] : compact) index = next++;
  const int64_t items = next;
  auto g_index = torch::empty_like(g_ids);
  for (int64_t i = 0; i < g_ids.size(0); ++i) g_index[i] = compact.at(g_ids[i].item<int64_t>());
  const auto q_ids = query_items.to(torch::kCPU, torch::kLong).contiguous();
  auto q_index = torch::empty_like(q_ids);
  for (int64_t i = 0; i < q_ids.size(0); ++i) {
    const auto it = compact.find(q_ids[i].item<int64_t>());
    expect(it != compact.end(), "query " + std::to_string(i) + " belongs to item " +
                                    std::to_string(q_ids[i].item<int64_t>()) + ", which has no row in the gallery");
    q_index[i] = it->second;
  }

  const int64_t Q = queries.size(0), G = gallery.size(0);
  const int64_t width = std::max(G, items);
  if (chunk <= 0) chunk = std::max<int64_t>(1, (int64_t{1} << 26) / width);
  const auto device = queries.device();
  const auto g_index_dev = g_index.to(device);
  const auto gallery_t = gallery.to(queries.scalar_type()).t();
  std::vector<int64_t> ranks;
  ranks.reserve(static_cast<size_t>(Q));
  for (int64_t q0 = 0; q0 < Q; q0 += chunk) {
    const int64_t c = std::min(chunk, Q - q0);
    const auto scores = queries.narrow(0, q0, c).matmul(gallery_t);  // (c, G)
    // Each item's best row, then how many other items reach the query's own item's best.
    const auto best = torch::full({c, items}, -std::numeric_limits<double>::infinity(), scores.options())
                          .scatter_reduce_(1, g_index_dev.unsqueeze(0).expand({c, G}), scores, "amax");
    const auto own = best.gather(1, q_index.narrow(0, q0, c).to(device).unsqueeze(1));  // (c, 1)
    const auto rank = (best >= own).sum(1).to(torch::kCPU, torch::kLong).contiguous();  // itself included: rank ≥ 1
    const int64_t* r = rank.data_ptr<int64_t>();
    ranks.insert(ranks.end(), r, r + c);
  }

  RetrievalResult result;
  result.queries = Q;
  result.gallery_items = items;
  result.ranks = ranks;
  result.r1 = result.recall_at(1);
  result.r5 = result.recall_at(5);
  result.r10 = result.recall_at(10);
  if (!ranks.empty()) {
    std::vector<int64_t> sorted = ranks;
    std::sort(sorted.begin(), sorted.end());
    const size_t n = sorted.size();
    result.median_rank = n % 2 == 1 ? static_cast<double>(sorted[n / 2])
                                    : 0.5 * static_cast<double>(sorted[n / 2 - 1] + sorted[n / 2]);
    result.mean_rank = static_cast<double>(std::accumulate(sorted.begin(), sorted.end(), int64_t{0})) /
                       static_cast<double>(n);
  }
  result.protocol = std::to_string(Q) + " queries against " + std::to_string(items) + " items (" + std::to_string(G) +
                    " gallery rows); dot-product scores; an item scores its best row; rank = 1 + other items "
                    "scoring >= the true item (ties count against the query); R@k = % of queries with rank <= k";
  return result;
}

}  // namespace longnet::pipelines
