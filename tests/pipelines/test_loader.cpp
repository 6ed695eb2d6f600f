// The loader: batches fixed by the seed whatever the number of workers, exact continuation after restore(), padding
// and presence flags, length bucketing, epochs, and errors named by sample.
// GCC 12 at -O3 reports false -Wstringop-overflow and -Wrestrict inside libstdc++'s string copy inlined here (bounds
// of 2^63 and more).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#pragma GCC diagnostic ignored "-Wrestrict"
#pragma GCC diagnostic ignored "-Warray-bounds"
#endif
#include <map>
#include <set>

#include <torch/torch.h>

#include "core/error.h"
#include "pipelines/loader.h"
#include "pipelines/shards.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using longnet::modalities::Modality;
using longnet::pipelines::Batch;
using longnet::pipelines::Loader;
using longnet::pipelines::LoaderOptions;
using longnet::pipelines::LoaderState;
using longnet::pipelines::SampleTensors;
using longnet::pipelines::ShardReader;
using longnet::pipelines::ShardWriter;
using longnet::test::TempDir;

namespace {

constexpr int kSamples = 37;

// Sample i: text of 3 + i % 5 tokens unless i % 4 == 1, video of 2 + i % 3 patches of dim 6 unless i % 3 == 2,
// audio (float16, dim 4) when i % 5 == 0. Every sample has at least one modality.
SampleTensors make_sample(int i) {
  SampleTensors s;
  if (i % 4 != 1) s.emplace_back("text_ids", torch::arange(i, i + 3 + i % 5, torch::kInt32));
  if (i % 3 != 2) {
    const int64_t n = 2 + i % 3;
    s.emplace_back("video_patches", (torch::arange(n * 6, torch::kInt32).reshape({n, 6}) + i).remainder(256)
                                        .to(torch::kUInt8));
    s.emplace_back("video_positions", torch::arange(n * 3, torch::kInt16).reshape({n, 3}));
  }
  if (i % 5 == 0) {
    s.emplace_back("audio_patches", torch::full({3, 4}, static_cast<double>(i), torch::kHalf));
    s.emplace_back("audio_positions", torch::zeros({3, 3}, torch::kInt32));
  }
  if (s.empty()) s.emplace_back("text_ids", torch::arange(5, torch::kInt32));
  return s;
}

fs::path write_shards(const TempDir& tmp) {
  const auto dir = tmp.path() / "shards";
  ShardWriter writer(dir, {.max_shard_bytes = 400});  // several shards
  for (int i = 0; i < kSamples; ++i) writer.add("s" + std::to_string(i), make_sample(i));
  writer.finish();
  return dir;
}

std::vector<std::vector<int64_t>> take(Loader& loader, int n) {
  std::vector<std::vector<int64_t>> out;
  for (int i = 0; i < n; ++i) out.push_back(loader.next().value().samples);
  return out;
}

}  // namespace

TEST_CASE("loader order depends on the seed only, not on the workers", "[pipelines]") {
  TempDir tmp;
  const ShardReader reader(write_shards(tmp));
  LoaderOptions options{.batch_size = 4, .seed = 11};
  options.workers = 1;
  Loader one(reader, options);
  options.workers = 3;
  options.prefetch = 7;
  Loader three(reader, options);
  REQUIRE(one.batches_per_epoch() == kSamples / 4);
  const auto a = take(one, 20), b = take(three, 20);  // more than two epochs
  CHECK(a == b);
  // An epoch visits every sample once (drop_last leaves kSamples % 4 out), and epochs differ in order.
  std::set<int64_t> seen;
  for (int i = 0; i < 9; ++i) seen.insert(a[static_cast<size_t>(i)].begin(), a[static_cast<size_t>(i)].end());
  CHECK(seen.size() == 36);
  CHECK(a[0] != a[9]);
  options.seed = 12;
  Loader other(reader, options);
  CHECK(take(other, 9) != std::vector<std::vector<int64_t>>(a.begin(), a.begin() + 9));
}

TEST_CASE("loader continues exactly where its state says after restore", "[pipelines]") {
  TempDir tmp;
  const ShardReader reader(write_shards(tmp));
  const LoaderOptions options{.batch_size = 5, .seed = 3, .bucket_batches = 2};
  Loader uninterrupted(reader, options);
  const auto all = take(uninterrupted, 17);
  Loader first(reader, options);
  take(first, 10);
  const LoaderState state = first.state();
  CHECK(state.epoch == 10 / first.batches_per_epoch());
  CHECK(state.batch == 10 % first.batches_per_epoch());
  Loader resumed(reader, options);  // a fresh process: a new loader restored to the saved state
  resumed.restore(state);
  CHECK(take(resumed, 7) == std::vector<std::vector<int64_t>>(all.begin() + 10, all.end()));
  CHECK_THROWS_AS(resumed.restore({0, 99}), longnet::DataError);
}

TEST_CASE("loader pads each modality and flags which samples have it", "[pipelines]") {
  TempDir tmp;
  const ShardReader reader(write_shards(tmp));
  Loader loader(reader, {.batch_size = 4, .shuffle = false, .pad_id = -1});
  const Batch batch = loader.collate({0, 1, 2, 5});
  REQUIRE(batch.ids == std::vector<std::string>{"s0", "s1", "s2", "s5"});
  const auto& present = batch.input.present;
  REQUIRE(present.sizes() == at::IntArrayRef{4, 4});
  // text: s1 and s5 have none; lengths 3, -, 5, -
  const auto& text = batch.input.modalities[0].value();
  CHECK(text.data.sizes() == at::IntArrayRef{4, 5});
  CHECK(torch::equal(present.select(1, 0), torch::tensor({true, false, true, false})));
  CHECK(torch::equal(text.data[2], torch::arange(2, 7, torch::kLong)));
  CHECK(torch::equal(text.data[0], torch::tensor({0, 1, 2, -1, -1}, torch::kLong)));
  CHECK(torch::equal(text.padding[0], torch::tensor({false, false, false, true, true})));
  CHECK(text.padding[1].all().item<bool>());
  // video: s2 and s5 have none, s0 2 patches, s1 3; uint8 maps to x/127.5 - 1; positions come along
  const auto& video = batch.input.modalities[2].value();
  CHECK(torch::equal(present.select(1, 2), torch::tensor({true, true, false, false})));
  CHECK(video.data.sizes() == at::IntArrayRef{4, 3, 6});
  CHECK(video.data[0][0][0].item<float>() == Approx(-1.0));
  CHECK(video.data[1][0][0].item<float>() == Approx(1.0 / 127.5 - 1.0));
  CHECK(torch::equal(video.positions[1].narrow(0, 0, 3), torch::arange(9, torch::kLong).reshape({3, 3})));
  CHECK(torch::equal(video.padding[0], torch::tensor({false, false, true})));
  CHECK(video.padding[3].all().item<bool>());
  // audio: s0 and s5; image: nobody, so not given at all
  CHECK(torch::equal(present.select(1, 3), torch::tensor({true, false, false, true})));
  CHECK(batch.input.modalities[3]->data[3][0][0].item<float>() == 5.0f);
  CHECK_FALSE(batch.input.modalities[1].has_value());
  CHECK_FALSE(present.select(1, 1).any().item<bool>());
}

TEST_CASE("loader leaves out unwanted modalities and samples that keep none, truncates, and ends epochs",
          "[pipelines]") {
  TempDir tmp;
  const ShardReader reader(write_shards(tmp));
  LoaderOptions options{.batch_size = 3, .epochs = 2, .drop_last = false};
  options.modalities = {false, false, false, true};  // audio only: samples 0, 5, ..., 35
  options.max_tokens = {0, 0, 0, 2};
  Loader loader(reader, options);
  CHECK(loader.batches_per_epoch() == 3);  // 8 samples, the last batch of 2 kept
  int batches = 0;
  while (auto batch = loader.next()) {
    ++batches;
    CHECK_FALSE(batch->input.modalities[0].has_value());
    CHECK(batch->input.modalities[3]->data.size(1) == 2);
    for (const int64_t s : batch->samples) CHECK(s % 5 == 0);
  }
  CHECK(batches == 6);
  options.modalities = {false, true, false, false};  // nobody has images
  CHECK_THROWS_AS(Loader(reader, options), longnet::DataError);
}

TEST_CASE("length bucketing puts samples of similar length together", "[pipelines]") {
  TempDir tmp;
  const ShardReader reader(write_shards(tmp));
  auto padding = [&](const LoaderOptions& options) {
    Loader loader(reader, options);
    int64_t padded = 0;
    for (int64_t i = 0; i < loader.batches_per_epoch(); ++i) {
      const Batch b = loader.next().value();
      for (const auto& m : b.input.modalities) {
        if (m) padded += m->padding.sum().item<int64_t>();
      }
    }
    return padded;
  };
  LoaderOptions options{.batch_size = 4, .seed = 5};
  options.modalities = {true, false, false, false};  // text alone: 30 samples of 3 to 7 tokens
  const int64_t plain = padding(options);
  options.bucket_batches = 7;
  const int64_t bucketed = padding(options);
  CAPTURE(plain, bucketed);
  CHECK(bucketed < plain);
}

TEST_CASE("loader names the sample whose fields do not fit the batch", "[pipelines]") {
  TempDir tmp;
  const auto dir = tmp.path() / "bad";
  {
    ShardWriter writer(dir);
    writer.add("a", {{"video_patches", torch::zeros({2, 6}, torch::kUInt8)},
                     {"video_positions", torch::zeros({2, 3}, torch::kInt32)}});
    writer.add("b", {{"video_patches", torch::zeros({2, 5}, torch::kUInt8)},
                     {"video_positions", torch::zeros({2, 3}, torch::kInt32)}});
    writer.add("c", {{"video_patches", torch::zeros({2, 6}, torch::kUInt8)}});
    writer.finish();
  }
  const ShardReader reader(dir);
  Loader loader(reader, {.batch_size = 1, .shuffle = false});
  CHECK_THROWS_WITH(loader.collate({0, 1}), Catch::Contains("sample 'b'") && Catch::Contains("patch size 5"));
  CHECK_THROWS_WITH(loader.collate({2}), Catch::Contains("sample 'c'") && Catch::Contains("video_positions"));
  // The same error surfaces from next() when a worker meets it.
  Loader threaded(reader, {.batch_size = 3, .shuffle = false, .drop_last = false});
  CHECK_THROWS_AS(threaded.next(), longnet::DataError);
}

TEST_CASE("half_patches delivers the float32 patch values rounded to float16", "[pipelines]") {
  TempDir tmp;
  const ShardReader reader(write_shards(tmp));
  LoaderOptions full{.batch_size = 5, .seed = 3};
  LoaderOptions half = full;
  half.half_patches = true;
  const Loader a(reader, full), b(reader, half);
  const std::vector<int64_t> samples{0, 1, 3, 5, 10};
  const Batch fa = a.collate(samples), fb = b.collate(samples);
  for (const Modality m : {Modality::video, Modality::audio}) {
    const auto& x = fa.input.modalities[static_cast<size_t>(m)];
    const auto& y = fb.input.modalities[static_cast<size_t>(m)];
    REQUIRE(x);
    REQUIRE(y);
    CHECK(y->data.scalar_type() == torch::kHalf);
    CHECK(torch::equal(x->data.to(torch::kHalf), y->data));
    CHECK(torch::equal(x->positions, y->positions));
    CHECK(torch::equal(x->padding, y->padding));
  }
  CHECK(torch::equal(fa.input.modalities[0]->data, fb.input.modalities[0]->data));  // text ids untouched
}

TEST_CASE("collation converts every stored patch and position type as torch does, and zeroes what follows a sample",
          "[pipelines]") {
  TempDir tmp;
  const auto dir = tmp.path() / "types";
  // Video: every byte value (uint8), then float16 and float32 with values that float16 rounds; image: float64 (a type
  // `longnet prepare` does not write). Positions int16, int32 and int64. Lengths differ, so rows have padding.
  const at::Tensor bytes = torch::arange(256, torch::kInt).to(torch::kUInt8).reshape({64, 4});
  const at::Tensor f16 = (torch::arange(40, torch::kFloat).reshape({10, 4}) / 3.0 - 5.0).to(torch::kHalf);
  const at::Tensor f32 = torch::arange(20, torch::kFloat).reshape({5, 4}) / 7.0 + 0.1;
  const at::Tensor f64 = torch::arange(8, torch::kDouble).reshape({2, 4}) / 9.0;
  {
    ShardWriter writer(dir);
    writer.add("u8", {{"video_patches", bytes}, {"video_positions", torch::arange(192, torch::kInt16).reshape({64, 3})},
                      {"image_patches", f64}, {"image_positions", torch::ones({2, 3}, torch::kLong)}});
    writer.add("f16", {{"video_patches", f16}, {"video_positions", torch::arange(30, torch::kInt32).reshape({10, 3})},
                       {"text_ids", torch::arange(3, torch::kInt16)}});
    writer.add("f32", {{"video_patches", f32}, {"video_positions", torch::arange(15, torch::kLong).reshape({5, 3})},
                       {"text_ids", torch::arange(4, torch::kLong)}});
    writer.finish();
  }
  const ShardReader reader(dir);
  const at::Tensor from_bytes = torch::arange(256, torch::kInt).reshape({64, 4}).to(torch::kFloat) / 127.5 - 1.0;
  const std::vector<at::Tensor> expected{from_bytes, f16.to(torch::kFloat), f32};
  for (const bool half : {false, true}) {
    CAPTURE(half);
    const Loader loader(reader, {.batch_size = 3, .shuffle = false, .pad_id = 7, .half_patches = half});
    const Batch batch = loader.collate({0, 1, 2});
    const auto& video = batch.input.modalities[static_cast<size_t>(Modality::video)].value();
    REQUIRE(video.data.sizes() == at::IntArrayRef{3, 64, 4});
    CHECK(video.data.scalar_type() == (half ? torch::kHalf : torch::kFloat));
    for (int64_t b = 0; b < 3; ++b) {
      const at::Tensor& full = expected[static_cast<size_t>(b)];
      const at::Tensor want = half ? full.to(torch::kHalf) : full;
      const int64_t n = full.size(0);
      CHECK(torch::equal(video.data[b].narrow(0, 0, n), want));
      CHECK(torch::equal(video.positions[b].narrow(0, 0, n), torch::arange(n * 3, torch::kLong).reshape({n, 3})));
      CHECK((video.data[b].narrow(0, n, 64 - n) == 0).all().item<bool>());
      CHECK((video.positions[b].narrow(0, n, 64 - n) == 0).all().item<bool>());
      CHECK_FALSE(video.padding[b].narrow(0, 0, n).any().item<bool>());
      CHECK(video.padding[b].narrow(0, n, 64 - n).all().item<bool>());
    }
    const auto& image = batch.input.modalities[static_cast<size_t>(Modality::image)].value();
    CHECK(torch::equal(image.data[0], half ? f64.to(torch::kFloat).to(torch::kHalf) : f64.to(torch::kFloat)));
    CHECK((image.data.narrow(0, 1, 2) == 0).all().item<bool>());
    CHECK(torch::equal(image.padding, torch::tensor({{false, false}, {true, true}, {true, true}})));
    const auto& text = batch.input.modalities[static_cast<size_t>(Modality::text)].value();
    CHECK(torch::equal(text.data, torch::tensor({{7, 7, 7, 7}, {0, 1, 2, 7}, {0, 1, 2, 3}}, torch::kLong)));
    CHECK(torch::equal(batch.input.present.select(1, static_cast<int64_t>(Modality::text)),
                       torch::tensor({false, true, true})));
  }
}

TEST_CASE("sample_captions takes each sample's captions in turn, fixed by seed and epoch", "[pipelines]") {
  TempDir tmp;
  const auto dir = tmp.path() / "captions";
  {
    ShardWriter writer(dir);
    for (int i = 0; i < 4; ++i) {
      // Three captions: [1, 10+i, 2], [1, 20+i, 2], [1, 30+i, 2]; text_ids is the first.
      writer.add("c" + std::to_string(i),
                 {{"text_ids", torch::tensor({1, 10 + i, 2}, torch::kInt32)},
                  {"captions_ids", torch::tensor({1, 10 + i, 2, 1, 20 + i, 2, 1, 30 + i, 2}, torch::kInt32)},
                  {"captions_offsets", torch::tensor({0, 3, 6, 9}, torch::kInt32)}});
    }
    writer.finish();
  }
  const ShardReader reader(dir);
  LoaderOptions options{.batch_size = 4, .seed = 5};
  const Loader plain(reader, options);
  CHECK(plain.collate({0, 1, 2, 3}, 7).input.modalities[0]->data.select(1, 1).equal(
      torch::tensor({10, 11, 12, 13}, torch::kLong)));
  options.sample_captions = true;
  const Loader sampled(reader, options), again(reader, options);
  std::set<int64_t> seen;
  for (int64_t epoch = 0; epoch < 12; ++epoch) {
    const auto ids = sampled.collate({0, 1, 2, 3}, epoch).input.modalities[0]->data;
    CHECK(ids.equal(again.collate({0, 1, 2, 3}, epoch).input.modalities[0]->data));  // fixed by (seed, epoch)
    for (int64_t b = 0; b < 4; ++b) {
      const int64_t token = ids[b][1].item<int64_t>();
      CHECK(token % 10 == b);  // a caption of its own sample
      seen.insert(token / 10);
    }
  }
  CHECK(seen == std::set<int64_t>{1, 2, 3});  // every caption is used
}

TEST_CASE("mixing draws sources by weight, walks each through its own passes and resumes exactly", "[pipelines]") {
  TempDir tmp;
  const ShardReader a(write_shards(tmp));  // 37 samples
  const auto b_dir = tmp.path() / "b";
  {
    ShardWriter writer(b_dir);
    for (int i = 0; i < 10; ++i) writer.add("b" + std::to_string(i), {{"text_ids", torch::arange(4, torch::kInt32) + i}});
    writer.finish();
  }
  const ShardReader b(b_dir);
  using longnet::pipelines::LoaderSource;
  auto sources = [&] {
    return std::vector<LoaderSource>{{.reader = &a, .weight = 1.0, .subset = {}},
                                     {.reader = &b, .weight = 3.0, .subset = {}}};
  };
  LoaderOptions options{.batch_size = 4, .seed = 5, .bucket_batches = 2};
  options.epoch_samples = 40;
  options.workers = 1;
  Loader one(sources(), options);
  CHECK(one.batches_per_epoch() == 10);
  const auto all = take(one, 500);  // 50 epochs, 2000 draws

  // Sample indices count over the sources in order: b's samples are 37..46, with b's ids.
  int64_t from_b = 0;
  std::vector<int64_t> b_order;
  for (const auto& batch : all) {
    for (const int64_t s : batch) {
      REQUIRE(s >= 0);
      REQUIRE(s < 47);
      if (s >= 37) ++from_b, b_order.push_back(s);
    }
  }
  // Weight 3 of 4: three quarters of the draws (binomial standard deviation ≈ 0.01).
  CHECK(static_cast<double>(from_b) / 2000.0 == Approx(0.75).margin(0.04));
  // b walks through permutations of its 10 samples: every block of 10 of its draws holds each sample once.
  // (Bucketing reorders within an epoch, so check the multiset over whole epochs instead of exact blocks.)
  std::map<int64_t, int64_t> counts;
  for (const int64_t s : b_order) ++counts[s];
  CHECK(counts.size() == 10);
  int64_t lo = INT64_MAX, hi = 0;
  for (const auto& [s, n] : counts) lo = std::min(lo, n), hi = std::max(hi, n);
  CHECK(hi - lo <= 1);

  const Batch first = Loader(sources(), options).next().value();
  CHECK(first.samples == all[0]);
  for (size_t r = 0; r < first.samples.size(); ++r) {
    const bool in_b = first.samples[r] >= 37;
    CHECK(first.ids[r].front() == (in_b ? 'b' : 's'));
  }

  // Workers do not change the order; a restored loader continues mid-epoch exactly.
  options.workers = 3;
  Loader three(sources(), options);
  CHECK(take(three, 60) == std::vector<std::vector<int64_t>>(all.begin(), all.begin() + 60));
  Loader interrupted(sources(), options);
  take(interrupted, 23);
  const LoaderState state = interrupted.state();
  CHECK(state.epoch == 2);
  CHECK(state.batch == 3);
  Loader resumed(sources(), options);
  resumed.restore(state);
  CHECK(take(resumed, 40) == std::vector<std::vector<int64_t>>(all.begin() + 23, all.begin() + 63));

  // Weights are part of the order; bad weights are configuration errors.
  auto other = sources();
  other[1].weight = 1.0;
  Loader reweighted(other, options);
  CHECK(take(reweighted, 10) != std::vector<std::vector<int64_t>>(all.begin(), all.begin() + 10));
  other[1].weight = 0.0;
  CHECK_THROWS_AS(Loader(other, options), longnet::ConfigError);
}

TEST_CASE("epoch_samples defines an epoch by samples seen, one dataset repeating in fresh passes", "[pipelines]") {
  TempDir tmp;
  const ShardReader reader(write_shards(tmp));
  LoaderOptions options{.batch_size = 4, .seed = 9};
  options.epoch_samples = 16;
  Loader loader(reader, options);
  CHECK(loader.batches_per_epoch() == 4);
  const auto batches = take(loader, 37);  // 148 draws = 4 passes over 37 samples
  std::vector<int64_t> flat;
  for (const auto& batch : batches) flat.insert(flat.end(), batch.begin(), batch.end());
  for (size_t pass = 0; pass < 4; ++pass) {
    const std::set<int64_t> seen(flat.begin() + static_cast<std::ptrdiff_t>(pass * 37),
                                 flat.begin() + static_cast<std::ptrdiff_t>((pass + 1) * 37));
    CHECK(seen.size() == 37);  // every sample once per pass
  }
  CHECK(std::vector<int64_t>(flat.begin(), flat.begin() + 37) != std::vector<int64_t>(flat.begin() + 37, flat.begin() + 74));
}

TEST_CASE("video_clip takes a held-out sample's extra clip in place of the first", "[pipelines]") {
  TempDir tmp;
  const auto dir = tmp.path() / "clips";
  {
    ShardWriter writer(dir);
    for (int i = 0; i < 2; ++i) {
      SampleTensors s{{"video_patches", torch::zeros({2, 3})}, {"video_positions", torch::zeros({2, 3}, torch::kInt32)}};
      if (i == 0) {
        s.emplace_back("video_patches_clip1", torch::ones({3, 3}));
        s.emplace_back("video_positions_clip1", torch::ones({3, 3}, torch::kInt32));
      }
      writer.add("v" + std::to_string(i), s);
    }
    writer.finish();
  }
  const ShardReader reader(dir);
  LoaderOptions options{.batch_size = 1, .shuffle = false};
  options.video_clip = 1;
  Loader loader(reader, options);
  const Batch first = loader.collate({0});
  const auto& video = first.input.modalities[static_cast<size_t>(Modality::video)];
  REQUIRE(video.has_value());
  CHECK(video->data.sizes() == std::vector<int64_t>{1, 3, 3});
  CHECK(video->data.eq(1).all().item<bool>());
  CHECK(video->positions.eq(1).all().item<bool>());
  CHECK_THROWS_WITH(loader.collate({1}), Catch::Contains("sample 'v1' has no video clip 1"));
}

TEST_CASE("sample_video_clips takes one clip of a training video per epoch, fixed by seed and epoch", "[pipelines]") {
  TempDir tmp;
  const auto dir = tmp.path() / "clips";
  {
    ShardWriter writer(dir);
    SampleTensors s{{"video_patches", torch::zeros({2, 3})}, {"video_positions", torch::zeros({2, 3}, torch::kInt32)}};
    for (int k = 1; k < 3; ++k) {
      s.emplace_back("video_patches_clip" + std::to_string(k), torch::full({2, 3}, static_cast<double>(k)));
      s.emplace_back("video_positions_clip" + std::to_string(k), torch::zeros({2, 3}, torch::kInt32));
    }
    writer.add("v", s);
    writer.finish();
  }
  const ShardReader reader(dir);
  LoaderOptions options{.batch_size = 1, .seed = 4};
  options.sample_video_clips = true;
  Loader loader(reader, options);
  auto clip_of = [&](const Loader& l, int64_t epoch) {
    return l.collate({0}, epoch).input.modalities[static_cast<size_t>(Modality::video)]->data[0][0][0].item<float>();
  };
  std::set<float> seen;
  for (int64_t epoch = 0; epoch < 30; ++epoch) {
    seen.insert(clip_of(loader, epoch));
    CHECK(clip_of(loader, epoch) == clip_of(loader, epoch));
  }
  CHECK(seen == std::set<float>{0.0F, 1.0F, 2.0F});
  options.video_clip = 2;  // a fixed clip wins
  Loader fixed(reader, options);
  for (int64_t epoch = 0; epoch < 5; ++epoch) CHECK(clip_of(fixed, epoch) == 2.0F);
}
