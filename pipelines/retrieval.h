// Cross-modal retrieval metrics (R@1/5/10, median and mean rank), computed in chunks of queries so that a 100k × 100k
// similarity matrix never exists at once.
//
// Protocol (what the numbers mean; RetrievalResult::protocol spells it out next to them):
//   - Scores are dot products of the embeddings (cosine similarity for the model's L2-normalised embeddings).
//   - Item-to-item: every gallery row belongs to one item and every query to one item (several captions of a video are
//     several rows with the same item). A query's rank is 1 + the number of *other items* whose best-scoring row
//     scores at least as high as the query's best-scoring row of its own item. Ties count against the query (a
//     constant embedding gets the worst rank, not the best).
//   - A query whose item has no row in the gallery is an error: the protocol needs the true match present.
//   - R@k is the percentage of queries with rank <= k; median and mean rank are over all queries.
//
//   auto r = retrieval_metrics(text_emb, text_item, video_emb, video_item);   // text → video
//   std::cout << r.recall_at(1) << " " << r.median_rank << "\n";
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace longnet::pipelines {

struct RetrievalResult {
  int64_t queries = 0;
  int64_t gallery_items = 0;
  std::vector<int64_t> ranks;  // per query, 1-based
  double r1 = 0, r5 = 0, r10 = 0;  // percent
  double median_rank = 0, mean_rank = 0;
  std::string protocol;        // one line describing how the numbers were computed

  double recall_at(int64_t k) const;  // percent of queries with rank <= k
};

// queries (Q, E), query_items (Q) int64; gallery (G, E), gallery_items (G) int64 (item ids, any values); rows are
// scored against every gallery row, `chunk` queries at a time (0: as many as keep a chunk under 2^26 scores).
// DataError for shape mismatches or a query whose item is not in the gallery.
RetrievalResult retrieval_metrics(const at::Tensor& queries, const at::Tensor& query_items, const at::Tensor& gallery,
                                  const at::Tensor& gallery_items, int64_t chunk = 0);

}  // namespace longnet::pipelines
