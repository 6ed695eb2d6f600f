// tools/make_synthetic_shards.py: its folders open with ShardReader (checksums verified), hold the documented fields,
// dtypes, shapes and positions, are byte for byte what ShardWriter writes for the same samples, depend on the seed
// alone, and collate into batches with the written modalities present.
// GCC 12 at -O3 reports false -Wstringop-overflow and -Wrestrict inside libstdc++'s string copy inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#pragma GCC diagnostic ignored "-Wrestrict"
#pragma GCC diagnostic ignored "-Warray-bounds"
#endif
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "pipelines/loader.h"
#include "pipelines/shards.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using longnet::pipelines::Batch;
using longnet::pipelines::Loader;
using longnet::pipelines::SampleTensors;
using longnet::pipelines::ShardReader;
using longnet::pipelines::ShardWriter;
using longnet::test::read_text;
using longnet::test::TempDir;

namespace {

// Runs the tool (from the source root, where ctest runs the suite) with the project's Python; its exit status.
int run_tool(const fs::path& out, const std::string& options, const fs::path& stderr_file) {
  const std::string command = std::string(LONGNET_TEST_PYTHON) + " tools/make_synthetic_shards.py --out '" +
                              out.string() + "' " + options + " 2>'" + stderr_file.string() + "'";
  return std::system(command.c_str());
}

// Every file of a folder, by name.
std::map<std::string, std::string> folder_bytes(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = read_text(e.path());
  return out;
}

std::vector<int64_t> shape_of(const ShardReader& reader, int64_t index, const std::string& field) {
  for (const auto& f : reader.fields(index)) {
    if (f.name == field) return f.shape;
  }
  return {};
}

// (t, y, x) rows as the patchify functions lay them out (modalities/patchify.h).
at::Tensor grid_positions(int64_t frames, int64_t grid) {
  const auto t = torch::arange(frames, torch::kInt).view({frames, 1, 1}).expand({frames, grid, grid});
  const auto y = torch::arange(grid, torch::kInt).view({1, grid, 1}).expand({frames, grid, grid});
  const auto x = torch::arange(grid, torch::kInt).view({1, 1, grid}).expand({frames, grid, grid});
  return torch::stack({t, y, x}, -1).reshape({frames * grid * grid, 3});
}

}  // namespace

TEST_CASE("make_synthetic_shards.py writes shards that the reader, the writer and the loader agree with",
          "[pipelines][cpu]") {
  const TempDir tmp;
  const fs::path a = tmp.path() / "a", b = tmp.path() / "b", c = tmp.path() / "c", log = tmp.path() / "stderr.txt";
  // 7 samples of about 1.2 KB against a 4 KiB limit (0.00390625 MiB): several shards.
  const std::string options =
      "--samples 7 --text-tokens 11 --vocab-size 50 --video-frames 3 --video-grid 4 --video-dim 6 "
      "--audio-patches 5 --audio-dim 8 --image-grid 2 --image-dim 10 --max-shard-mb 0.00390625";
  REQUIRE(run_tool(a, options + " --seed 3", log) == 0);
  const std::string summary = read_text(log);
  CAPTURE(summary);
  CHECK(summary.find("7 samples") != std::string::npos);
  CHECK(summary.find("tokens per sample: text 11, image 4, video 48, audio 5") != std::string::npos);

  const ShardReader reader(a);  // verifies sizes and CRC-32s
  REQUIRE(reader.size() == 7);
  const auto index = nlohmann::json::parse(read_text(a / "index.json"));
  CHECK(index["complete"] == true);
  CHECK(index["checksum"] == "crc32");
  CHECK(index["shards"].size() > 1);
  CHECK_FALSE(fs::exists(a / "index.partial.json"));

  const std::map<std::string, std::pair<at::ScalarType, std::vector<int64_t>>> expected = {
      {"text_ids", {torch::kInt, {11}}},
      {"image_patches", {torch::kByte, {4, 10}}},
      {"image_positions", {torch::kInt, {4, 3}}},
      {"video_patches", {torch::kByte, {48, 6}}},
      {"video_positions", {torch::kInt, {48, 3}}},
      {"audio_patches", {torch::kByte, {5, 8}}},
      {"audio_positions", {torch::kInt, {5, 3}}},
  };
  const auto audio_positions =
      torch::stack({torch::arange(5, torch::kInt), torch::zeros({5}, torch::kInt), torch::zeros({5}, torch::kInt)}, 1);
  for (int64_t i = 0; i < reader.size(); ++i) {
    CAPTURE(i);
    char id[16];
    std::snprintf(id, sizeof id, "syn%05d", static_cast<int>(i));
    CHECK(reader.id(i) == id);
    const auto fields = reader.read(i);
    REQUIRE(fields.size() == expected.size());
    for (const auto& [name, want] : expected) {
      CAPTURE(name);
      REQUIRE(fields.contains(name));
      CHECK(fields.at(name).scalar_type() == want.first);
      CHECK(fields.at(name).sizes().vec() == want.second);
      CHECK(shape_of(reader, i, name) == want.second);
    }
    const auto& text = fields.at("text_ids");
    CHECK(text[0].item<int>() == 1);    // BOS
    CHECK(text[10].item<int>() == 2);   // EOS
    const auto body = text.narrow(0, 1, 9);
    CHECK(body.min().item<int>() >= 4);
    CHECK(body.max().item<int>() < 50);
    CHECK(torch::equal(fields.at("video_positions"), grid_positions(3, 4)));  // (frame, row, column)
    CHECK(torch::equal(fields.at("image_positions"), grid_positions(1, 2)));  // (0, row, column)
    CHECK(torch::equal(fields.at("audio_positions"), audio_positions));       // (patch index, 0, 0)
    // Random bytes, not a constant: 288 bytes take about 170 distinct values.
    CHECK(torch::bincount(fields.at("video_patches").flatten().to(torch::kLong)).gt(0).sum().item<int64_t>() > 100);
  }
  // Samples differ from one another.
  CHECK_FALSE(torch::equal(reader.read(0, "video_patches"), reader.read(1, "video_patches")));

  // ShardWriter, given the same samples (fields in name order, as the tool stores them) and the same limit, writes
  // the same files byte for byte: shard headers, padding, boundaries, CRC-32s and index.json.
  {
    ShardWriter writer(c, {.max_shard_bytes = 4096});
    for (int64_t i = 0; i < reader.size(); ++i) {
      SampleTensors sample;
      for (auto& [name, t] : reader.read(i)) sample.emplace_back(name, t);
      writer.add(reader.id(i), sample);
    }
    writer.finish();
  }
  const auto tool_files = folder_bytes(a);
  CHECK(tool_files == folder_bytes(c));
  CHECK(tool_files.size() == index["shards"].size() + 1);

  // A plain numpy safetensors reader agrees with the files (tests/pipelines/read_safetensors.py).
  const fs::path numpy_summary = tmp.path() / "summary.json";
  const std::string numpy_command = std::string(LONGNET_TEST_PYTHON) + " tests/pipelines/read_safetensors.py '" +
                                    a.string() + "' '" + numpy_summary.string() + "'";
  REQUIRE(std::system(numpy_command.c_str()) == 0);
  CHECK(nlohmann::json::parse(read_text(numpy_summary)).size() == 7 * expected.size());

  // The same seed gives the same bytes (also over an earlier folder, whose extra shards go); another seed differs.
  REQUIRE(run_tool(b, "--samples 12 --text-tokens 5 --max-shard-mb 0.00001", log) == 0);
  REQUIRE(run_tool(b, options + " --seed 3", log) == 0);
  CHECK(folder_bytes(b) == tool_files);
  REQUIRE(run_tool(b, options + " --seed 4", log) == 0);
  const auto other = folder_bytes(b);
  REQUIRE(other.size() == tool_files.size());
  for (const auto& [name, bytes] : other) {
    CAPTURE(name);
    REQUIRE(tool_files.contains(name));
    CHECK(bytes.size() == tool_files.at(name).size());  // same shapes, same layout
    CHECK(bytes != tool_files.at(name));
  }

  // The loader collates all four modalities, present in every sample; uint8 maps into [-1, 1].
  {
    Loader loader(reader, {.batch_size = 3, .shuffle = false, .workers = 1});
    const Batch batch = loader.collate({0, 4, 6});
    CHECK(batch.ids == std::vector<std::string>{"syn00000", "syn00004", "syn00006"});
    REQUIRE(batch.input.present.sizes() == at::IntArrayRef{3, 4});
    CHECK(batch.input.present.all().item<bool>());
    const auto& m = batch.input.modalities;
    REQUIRE(m[0].has_value());
    REQUIRE(m[1].has_value());
    REQUIRE(m[2].has_value());
    REQUIRE(m[3].has_value());
    CHECK(m[0]->data.sizes() == at::IntArrayRef{3, 11});
    CHECK(m[1]->data.sizes() == at::IntArrayRef{3, 4, 10});
    CHECK(m[2]->data.sizes() == at::IntArrayRef{3, 48, 6});
    CHECK(m[3]->data.sizes() == at::IntArrayRef{3, 5, 8});
    CHECK(torch::equal(m[2]->positions[1], grid_positions(3, 4).to(torch::kLong)));
    CHECK(m[2]->data.abs().max().item<float>() <= 1.0f);
    CHECK_FALSE(m[2]->padding.any().item<bool>());
  }

  // Only the modalities asked for: text and video.
  const fs::path tv = tmp.path() / "tv";
  REQUIRE(run_tool(tv, "--samples 4 --seed 0 --text-tokens 8 --vocab-size 100 --video-frames 2 --video-grid 3 "
                       "--video-dim 12",
                   log) == 0);
  const ShardReader tv_reader(tv);
  REQUIRE(tv_reader.size() == 4);
  std::set<std::string> names;
  for (const auto& f : tv_reader.fields(0)) names.insert(f.name);
  CHECK(names == std::set<std::string>{"text_ids", "video_patches", "video_positions"});
  Loader loader(tv_reader, {.batch_size = 4, .shuffle = false, .workers = 1});
  const Batch batch = loader.collate({0, 1, 2, 3});
  CHECK(torch::equal(batch.input.present.any(0), torch::tensor({true, false, true, false})));
  CHECK(batch.input.modalities[0].has_value());
  CHECK_FALSE(batch.input.modalities[1].has_value());
  CHECK(batch.input.modalities[2].has_value());
  CHECK_FALSE(batch.input.modalities[3].has_value());
  CHECK(batch.input.modalities[2]->data.sizes() == at::IntArrayRef{4, 18, 12});
}

TEST_CASE("make_synthetic_shards.py refuses bad values with a message", "[pipelines][cpu]") {
  const TempDir tmp;
  const fs::path out = tmp.path() / "out", log = tmp.path() / "stderr.txt";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--samples 0 --text-tokens 4", "--samples: 0 must be >= 1"},
      {"--text-tokens 1", "--text-tokens must be >= 2"},
      {"--text-tokens 8 --vocab-size 4", "--vocab-size must be > 4"},
      {"--video-grid x", "--video-grid: 'x' is not an integer"},
      {"--audio-dim 8 --max-shard-mb 0", "--max-shard-mb: '0' must be a positive"},
      {"--samples 3", "no modality"},
  };
  for (const auto& [options, message] : cases) {
    CAPTURE(options);
    CHECK(run_tool(out, options, log) != 0);
    CHECK(read_text(log).find(message) != std::string::npos);
    CHECK_FALSE(fs::exists(out / "index.json"));
  }
  // A folder with other files in it is not overwritten.
  tmp.write("out/notes.txt", "keep me");
  CHECK(run_tool(out, "--text-tokens 4", log) != 0);
  CHECK(read_text(log).find("not shards (notes.txt)") != std::string::npos);
  CHECK(read_text(out / "notes.txt") == "keep me");
}
