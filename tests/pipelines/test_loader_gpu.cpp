// The loader for a CUDA run (pin_memory): every tensor a batch moves to the GPU is in pinned host memory, so that its
// copy does not wait for the work queued before it.
// GCC 12 at -O3 reports false -Wstringop-overflow and -Wrestrict inside libstdc++'s string copy inlined here (as in
// test_loader.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#pragma GCC diagnostic ignored "-Wrestrict"
#endif
#include <string>

#include <torch/torch.h>

#include "pipelines/loader.h"
#include "pipelines/shards.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

using longnet::pipelines::Batch;
using longnet::pipelines::Loader;
using longnet::pipelines::SampleTensors;
using longnet::pipelines::ShardReader;
using longnet::pipelines::ShardWriter;

TEST_CASE("with pin_memory every tensor of a batch is in pinned host memory", "[pipelines][gpu]") {
  REQUIRE(torch::cuda::is_available());
  longnet::test::TempDir tmp;
  const auto dir = tmp.path() / "shards";
  {
    ShardWriter writer(dir, {});
    for (int i = 0; i < 4; ++i) {
      SampleTensors s;
      s.emplace_back("text_ids", torch::arange(3 + i, torch::kInt32));
      s.emplace_back("video_patches", torch::rand({2 + i, 6}));
      s.emplace_back("video_positions", torch::zeros({2 + i, 3}, torch::kInt16));
      writer.add("s" + std::to_string(i), s);
    }
    writer.finish();
  }
  const ShardReader reader(dir);
  Loader loader(reader, {.batch_size = 4, .shuffle = false, .half_patches = true, .pin_memory = true});
  const Batch batch = loader.collate({0, 1, 2, 3});
  int checked = 0;
  for (const auto& m : batch.input.modalities) {
    if (!m) continue;
    for (const at::Tensor* t : {&m->data, &m->positions, &m->padding}) {
      if (!t->defined()) continue;
      CHECK(t->is_pinned());
      ++checked;
    }
  }
  CHECK(checked == 5);  // text ids and padding; video patches, positions and padding
}
