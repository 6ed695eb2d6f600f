// Prepared samples in sharded tensor files: many samples per file, each file in the safetensors format, and an
// index.json that lists the shards, the samples in each, their fields and a CRC-32 per shard.
//
//   pipelines::ShardWriter writer("data/demo/shards", {.max_shard_bytes = 64 << 20});
//   for (const auto& s : samples) {
//     if (writer.contains(s.id)) continue;  // kept from an interrupted earlier run
//     writer.add(s.id, {{"video_patches", patches}, {"video_positions", positions}, {"text_ids", ids}});
//   }
//   writer.finish();  // closes the last shard, then writes index.json
//
//   const pipelines::ShardReader reader("data/demo/shards");
//   at::Tensor ids = reader.read(12, "text_ids");  // sample 12, read from its shard with pread
//
// A shard file (shard-00000.safetensors) is standard safetensors, readable by the `safetensors` package: 8 bytes
// little-endian header length, a JSON header mapping tensor names to {"dtype", "shape", "data_offsets"} plus
// "__metadata__" (format, first_sample, sample_ids), then the raw little-endian bytes, tensors back to back.
// Tensors are named "<sample_index>.<field>", the sample index counting over all shards ("12.video_patches").
//
// Crash safety: every file is written to a temporary name, fsync'ed and renamed. After each shard closes, the
// writer rewrites index.partial.json; finish() writes index.json and removes the partial one. A writer opened on
// a folder with an earlier index keeps the listed shards up to the first one that is missing or fails its size
// or CRC check, deletes temporary leftovers and unlisted shard files, and reports the kept samples through
// contains(), so the caller adds only the rest. Samples that were in a shard not yet closed are lost and re-added.
//
// Errors: DataError naming the file for a missing, truncated or corrupt index or shard (and the checksum when it
// does not match); ConfigError for bad arguments (duplicate sample id, unsupported dtype, bad field name).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace longnet::pipelines {

// A sample's fields in the order they are stored: field name ("video_patches") and tensor (any device, any
// layout; stored contiguous). Supported dtypes: bool, uint8, int8, int16, int32, int64, float16, bfloat16, float32,
// float64.
using SampleTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct ShardField {
  std::string name;
  std::string dtype;  // safetensors spelling: "U8", "I32", "F16", ...
  std::vector<int64_t> shape;
  int64_t bytes = 0;
};

struct ShardWriterOptions {
  // A shard is closed before a sample that would take it past this size; a larger sample gets a shard of its own.
  int64_t max_shard_bytes = int64_t{256} << 20;
  std::string file_prefix = "shard";
};

class ShardWriter {
 public:
  // Creates `dir` if needed and resumes from an earlier index found there (see above).
  explicit ShardWriter(std::filesystem::path dir, ShardWriterOptions options = {});
  // Without finish(), samples not yet in a closed shard are dropped; the folder stays resumable.
  ~ShardWriter() = default;
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Whether a sample with this id is already stored (kept from an earlier run or added now).
  bool contains(std::string_view id) const;
  // Appends a sample; closes the current shard first when it would grow past the size limit. A sample whose id is
  // already stored is a ConfigError.
  void add(const std::string& id, const SampleTensors& fields);
  // Closes the open shard and writes index.json. The writer accepts no samples afterwards.
  void finish();

  int64_t samples() const { return next_sample_; }
  int64_t kept_samples() const { return kept_samples_; }  // samples resumed from an earlier run
  int64_t shards() const { return static_cast<int64_t>(closed_.size()); }

 private:
  struct PendingSample {
    std::string id;
    std::vector<ShardField> fields;
  };
  struct ClosedShard {
    std::string file;
    int64_t bytes = 0;
    uint32_t crc32 = 0;
    int64_t first_sample = 0;
    std::vector<PendingSample> samples;
  };
  void resume();
  void close_shard();
  void write_index(const std::filesystem::path& file, bool complete) const;
  std::string shard_name(size_t number) const;

  std::filesystem::path dir_;
  ShardWriterOptions options_;
  std::vector<ClosedShard> closed_;
  std::unordered_set<std::string> ids_;
  int64_t next_sample_ = 0;
  int64_t kept_samples_ = 0;
  bool finished_ = false;
  // The open shard: header entries, raw bytes, and its samples.
  std::vector<std::pair<std::string, ShardField>> open_tensors_;  // tensor name -> field (offsets follow order)
  std::string open_data_;
  std::vector<PendingSample> open_samples_;
  int64_t open_first_sample_ = 0;
};

struct ShardReaderOptions {
  // Reads every shard once at open and compares its CRC-32 with the index.
  bool verify_checksums = true;
};

class ShardReader {
 public:
  // Reads dir/index.json and every shard's header; DataError naming the file when anything is missing or does not
  // match the index.
  explicit ShardReader(std::filesystem::path dir, ShardReaderOptions options = {});
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;

  int64_t size() const { return static_cast<int64_t>(samples_.size()); }
  const std::string& id(int64_t index) const;
  std::optional<int64_t> find(std::string_view id) const;
  const std::vector<ShardField>& fields(int64_t index) const;

  // All fields of a sample, as CPU tensors of the stored dtype and shape. Safe to call from several threads.
  std::map<std::string, at::Tensor> read(int64_t index) const;
  at::Tensor read(int64_t index, std::string_view field) const;

 private:
  struct Sample {
    std::string id;
    size_t shard = 0;
    std::vector<ShardField> fields;
    std::vector<int64_t> offsets;  // file offset of each field's bytes
  };
  struct Shard {
    std::filesystem::path path;
    int fd = -1;
  };
  const Sample& sample(int64_t index) const;
  at::Tensor read_field(const Sample& s, size_t field) const;

  std::filesystem::path dir_;
  std::vector<Shard> shards_;
  std::vector<Sample> samples_;
  std::unordered_map<std::string, int64_t> by_id_;
};

// CRC-32 (zlib's polynomial) of a file's bytes; IoError when it cannot be read.
uint32_t file_crc32(const std::filesystem::path& file);

}  // namespace longnet::pipelines
