// Tensor shards: samples round-trip through safetensors files with their dtypes and shapes, shards close at the
// size limit, an interrupted write resumes to the same files, corruption is reported with the file's name, and a
// plain numpy reader understands the files.
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "pipelines/shards.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using longnet::pipelines::SampleTensors;
using longnet::pipelines::ShardReader;
using longnet::pipelines::ShardReaderOptions;
using longnet::pipelines::ShardWriter;
using longnet::pipelines::ShardWriterOptions;
using longnet::test::read_text;
using longnet::test::TempDir;

namespace {

// "s<i>", formatted without std::string's operator+ (GCC 12 reports a false stringop-overflow for it at -O3).
std::string sample_id(int i) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "s%d", i);
  return buf;
}

// A sample in the shape the video/audio/text pipelines produce, with contents that depend on its index.
SampleTensors make_sample(int i) {
  auto g = at::detail::createCPUGenerator(static_cast<uint64_t>(1000 + i));
  const int64_t patches = 3 + i % 4;
  return {
      {"video_patches", torch::randint(0, 256, {patches, 2, 4, 4, 3}, g, torch::kUInt8)},
      {"video_positions", torch::arange(patches * 3, torch::kInt32).reshape({patches, 3}) + i},
      {"audio_mel", torch::randn({5, 8}, g).to(torch::kHalf)},
      {"text_ids", torch::arange(i, i + 7, torch::kInt32)},
      {"weights", torch::randn({2, 3}, g).to(torch::kBFloat16).t()},  // non-contiguous on purpose
      {"mask", torch::rand({4}, g) > 0.5},
      {"positions16", torch::arange(6, torch::kInt16) * static_cast<int16_t>(i)},
  };
}

void write_samples(const fs::path& dir, int first, int last, int64_t max_bytes, bool finish) {
  ShardWriter writer(dir, ShardWriterOptions{.max_shard_bytes = max_bytes});
  for (int i = first; i < last; ++i) {
    if (writer.contains(sample_id(i))) continue;
    writer.add(sample_id(i), make_sample(i));
  }
  if (finish) writer.finish();
}

void check_all(const ShardReader& reader, int n) {
  REQUIRE(reader.size() == n);
  for (int i = 0; i < n; ++i) {
    CAPTURE(i);
    CHECK(reader.id(i) == sample_id(i));
    CHECK(reader.find(sample_id(i)) == i);
    const auto expected = make_sample(i);
    const auto got = reader.read(i);
    REQUIRE(got.size() == expected.size());
    for (const auto& [name, tensor] : expected) {
      CAPTURE(name);
      const auto& t = got.at(name);
      CHECK(t.scalar_type() == tensor.scalar_type());
      CHECK(t.sizes() == tensor.sizes());
      CHECK(torch::equal(t, tensor));
    }
  }
}

std::string file_bytes(const fs::path& p) { return read_text(p); }

bool message_has(const std::exception& e, const std::string& what) {
  return std::string(e.what()).find(what) != std::string::npos;
}

}  // namespace

TEST_CASE("shards round-trip samples and close at the size limit", "[pipelines][cpu]") {
  const TempDir dir;
  // One sample is about 0.5 KB: a 2 KB limit gives several shards.
  write_samples(dir.path(), 0, 20, 2048, true);
  const ShardReader reader(dir.path());
  check_all(reader, 20);
  CHECK(reader.read(7, "text_ids").equal(torch::arange(7, 14, torch::kInt32)));
  CHECK_FALSE(reader.find("s20").has_value());
  CHECK_THROWS_AS(reader.read(20), longnet::ConfigError);
  CHECK_THROWS_AS(reader.read(0, "nope"), longnet::ConfigError);

  const auto index = nlohmann::json::parse(read_text(dir.path() / "index.json"));
  CHECK(index["complete"] == true);
  CHECK(index["samples"] == 20);
  const auto& shards = index["shards"];
  REQUIRE(shards.size() > 2);
  int64_t listed = 0;
  for (const auto& s : shards) {
    const auto path = dir.path() / s["file"].get<std::string>();
    CHECK(static_cast<int64_t>(fs::file_size(path)) == s["bytes"].get<int64_t>());
    listed += static_cast<int64_t>(s["samples"].size());
    int64_t data = 0;
    for (const auto& sample : s["samples"]) {
      for (const auto& [name, f] : sample["fields"].items()) data += f["bytes"].get<int64_t>();
    }
    CHECK(data <= 2048);
  }
  CHECK(listed == 20);
  CHECK(index["shards"][0]["samples"][0]["fields"]["audio_mel"]["dtype"] == "F16");
  CHECK(index["shards"][0]["samples"][0]["fields"]["video_patches"]["shape"] ==
        nlohmann::json::array({3, 2, 4, 4, 3}));
  CHECK_FALSE(fs::exists(dir.path() / "index.partial.json"));

  // A sample larger than the limit gets a shard of its own.
  const TempDir big;
  {
    ShardWriter w(big.path(), {.max_shard_bytes = 64});
    w.add("a", {{"x", torch::zeros({100}, torch::kUInt8)}});
    w.add("b", {{"x", torch::ones({10}, torch::kUInt8)}});
    w.finish();
    CHECK(w.shards() == 2);
  }
  CHECK(ShardReader(big.path()).read(1, "x").equal(torch::ones({10}, torch::kUInt8)));
}

TEST_CASE("an interrupted shard write resumes to the same files", "[pipelines][cpu]") {
  const TempDir whole, resumed;
  write_samples(whole.path(), 0, 30, 2048, true);

  // First run stops after sample 17 without finish(): its open shard is lost, the closed ones are listed in the
  // partial index. Leftovers of a crash: a temporary file and a shard written after the last index update.
  write_samples(resumed.path(), 0, 17, 2048, false);
  CHECK_FALSE(fs::exists(resumed.path() / "index.json"));
  REQUIRE(fs::exists(resumed.path() / "index.partial.json"));
  const auto partial = nlohmann::json::parse(read_text(resumed.path() / "index.partial.json"));
  CHECK(partial["complete"] == false);
  const size_t kept_shards = partial["shards"].size();
  REQUIRE(kept_shards >= 2);
  std::ofstream(resumed.path() / "shard-00001.safetensors.tmp.999") << "half";
  std::ofstream(resumed.path() / "shard-00099.safetensors") << "orphan";
  CHECK_THROWS_AS(ShardReader(resumed.path()), longnet::DataError);  // not finished: no index.json

  {
    ShardWriter writer(resumed.path(), {.max_shard_bytes = 2048});
    CHECK(writer.shards() == static_cast<int64_t>(kept_shards));
    CHECK(writer.kept_samples() > 0);
    CHECK(writer.kept_samples() < 17);
    CHECK(writer.contains("s0"));
    CHECK_FALSE(writer.contains("s16"));
    CHECK_FALSE(fs::exists(resumed.path() / "shard-00001.safetensors.tmp.999"));
    CHECK_FALSE(fs::exists(resumed.path() / "shard-00099.safetensors"));
    CHECK_THROWS_AS(writer.add("s0", make_sample(0)), longnet::ConfigError);  // already stored
    for (int i = 0; i < 30; ++i) {
      if (!writer.contains(sample_id(i))) writer.add(sample_id(i), make_sample(i));
    }
    writer.finish();
  }
  // Byte for byte what the uninterrupted run wrote.
  CHECK(file_bytes(resumed.path() / "index.json") == file_bytes(whole.path() / "index.json"));
  for (const auto& e : fs::directory_iterator(whole.path())) {
    CAPTURE(e.path().filename());
    CHECK(file_bytes(resumed.path() / e.path().filename()) == file_bytes(e.path()));
  }
  check_all(ShardReader(resumed.path()), 30);

  // A damaged shard in the middle: the writer keeps only the shards before it.
  {
    std::fstream f(resumed.path() / "shard-00002.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-1, std::ios::end);
    f.put('\x55');
  }
  ShardWriter again(resumed.path(), {.max_shard_bytes = 2048});
  CHECK(again.shards() == 2);
  CHECK_FALSE(fs::exists(resumed.path() / "shard-00002.safetensors"));
  CHECK_FALSE(fs::exists(resumed.path() / "shard-00003.safetensors"));
}

TEST_CASE("a corrupt or truncated shard is a DataError naming the file", "[pipelines][cpu]") {
  const TempDir dir;
  write_samples(dir.path(), 0, 6, 1 << 20, true);
  const fs::path shard = dir.path() / "shard-00000.safetensors";
  const std::string original = file_bytes(shard);

  SECTION("a flipped data byte fails the checksum") {
    std::string bad = original;
    bad[bad.size() - 10] ^= 0x01;
    std::ofstream(shard, std::ios::binary) << bad;
    try {
      ShardReader r(dir.path());
      FAIL("no error");
    } catch (const longnet::DataError& e) {
      CHECK(message_has(e, shard.string()));
      CHECK(message_has(e, "CRC-32"));
    }
    // Without verification the file opens (the flipped byte is data, not structure).
    CHECK(ShardReader(dir.path(), ShardReaderOptions{.verify_checksums = false}).size() == 6);
  }
  SECTION("a truncated file fails the size check even without verification") {
    std::ofstream(shard, std::ios::binary) << original.substr(0, original.size() / 2);
    try {
      ShardReader r(dir.path(), ShardReaderOptions{.verify_checksums = false});
      FAIL("no error");
    } catch (const longnet::DataError& e) {
      CHECK(message_has(e, shard.string()));
      CHECK(message_has(e, "truncated"));
    }
  }
  SECTION("a damaged header") {
    std::string bad = original;
    bad[8] = '#';  // the opening brace of the JSON header
    std::ofstream(shard, std::ios::binary) << bad;
    try {
      ShardReader r(dir.path(), ShardReaderOptions{.verify_checksums = false});
      FAIL("no error");
    } catch (const longnet::DataError& e) {
      CHECK(message_has(e, shard.string()));
      CHECK(message_has(e, "header"));
    }
    bad = original;
    bad[12] = '#';  // renames the first tensor, "0.audio_mel"
    std::ofstream(shard, std::ios::binary) << bad;
    try {
      ShardReader r(dir.path(), ShardReaderOptions{.verify_checksums = false});
      FAIL("no error");
    } catch (const longnet::DataError& e) {
      CHECK(message_has(e, shard.string()));
      CHECK(message_has(e, "tensor '0.audio_mel' listed in the index is missing"));
    }
  }
  SECTION("a missing shard and a malformed index") {
    fs::remove(shard);
    CHECK_THROWS_AS(ShardReader(dir.path()), longnet::DataError);
    std::ofstream(dir.path() / "index.json") << "{\"format\": \"longnet-shards\"";
    try {
      ShardReader r(dir.path());
      FAIL("no error");
    } catch (const longnet::DataError& e) {
      CHECK(message_has(e, "index.json"));
    }
  }
}

TEST_CASE("the shard writer rejects bad samples", "[pipelines][cpu]") {
  const TempDir dir;
  ShardWriter w(dir.path());
  w.add("a", {{"x", torch::zeros({2})}});
  CHECK_THROWS_AS(w.add("a", {{"x", torch::zeros({2})}}), longnet::ConfigError);
  CHECK_THROWS_AS(w.add("b", {{"x", torch::zeros({2}, torch::kComplexFloat)}}), longnet::ConfigError);
  CHECK_THROWS_AS(w.add("c", {{"x.y", torch::zeros({2})}}), longnet::ConfigError);
  CHECK_THROWS_AS(w.add("d", {{"x", torch::zeros({2})}, {"x", torch::zeros({2})}}), longnet::ConfigError);
  CHECK_THROWS_AS(w.add("e", {}), longnet::ConfigError);
  CHECK_THROWS_AS(w.add("", {{"x", torch::zeros({2})}}), longnet::ConfigError);
  w.finish();
  CHECK_THROWS_AS(w.add("f", {{"x", torch::zeros({2})}}), longnet::ConfigError);
  CHECK(ShardReader(dir.path()).size() == 1);
}

TEST_CASE("numpy alone reads the shards as safetensors files", "[pipelines][cpu]") {
  const TempDir dir;
  write_samples(dir.path(), 0, 9, 2048, true);
  const fs::path summary_file = dir.path() / "summary.json";
  const std::string command = std::string(LONGNET_TEST_PYTHON) + " tests/pipelines/read_safetensors.py '" +
                              dir.path().string() + "' '" + summary_file.string() + "'";
  REQUIRE(std::system(command.c_str()) == 0);
  const auto summary = nlohmann::json::parse(read_text(summary_file));
  CHECK(summary.size() == 9 * 7);
  for (int i = 0; i < 9; ++i) {
    for (const auto& [name, tensor] : make_sample(i)) {
      std::string key = std::to_string(i);
      key += ".";
      key += name;
      CAPTURE(key);
      REQUIRE(summary.contains(key));
      const auto& s = summary[key];
      CHECK(s["shape"].get<std::vector<int64_t>>() == tensor.sizes().vec());
      const auto as_double = tensor.to(torch::kDouble);
      CHECK(s["sum"].get<double>() == Approx(as_double.sum().item<double>()).margin(1e-6));
      CHECK(s["first"].get<double>() == Approx(as_double.contiguous().view(-1)[0].item<double>()).margin(1e-9));
    }
  }
}
