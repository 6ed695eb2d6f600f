// Dataset manifests: JSON Lines, one sample per line, naming each sample's media files and captions.
//
//   {"id": "s0001", "split": "train", "video": "videos/s0001.mp4", "audio": "audio/s0001.wav",
//    "image": "images/s0001.png", "text": ["two red squares moving left"], "label": 3}
//
//   id     required, unique string
//   split  "train" (default when absent), "val" or "test"
//   video, audio, image   optional file paths, relative to the manifest's folder (or absolute)
//   text   optional caption: a string or a non-empty list of strings
//   label  optional integer class index or string class name
// A sample needs at least one of video, audio, image, text. Blank lines are skipped; any other key is an error.
//
//   const auto m = pipelines::Manifest::load("data/demo/manifest.jsonl");
//   for (const auto* s : m.split(pipelines::Split::train)) use(s->video, s->text);
//
// Every error is a DataError starting with "manifest.jsonl:LINE:" and naming the key when there is one.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace longnet::pipelines {

enum class Split { train, val, test };
std::string_view split_name(Split split);

struct ManifestSample {
  std::string id;
  Split split = Split::train;
  // Resolved: relative paths are joined to the manifest's folder.
  std::optional<std::filesystem::path> video, audio, image;
  std::vector<std::string> text;  // captions; empty when the sample has none
  std::optional<int64_t> label_index;
  std::optional<std::string> label_name;
  int line = 0;  // 1-based line of the manifest
};

struct ManifestOptions {
  // Each named media file must exist (else a DataError naming the line and key).
  bool check_files = true;
};

class Manifest {
 public:
  static Manifest load(const std::filesystem::path& file, const ManifestOptions& options = {});
  // `file` names the text in errors and is the base of relative paths.
  static Manifest parse(std::string_view text, const std::filesystem::path& file,
                        const ManifestOptions& options = {});

  const std::vector<ManifestSample>& samples() const { return samples_; }
  std::vector<const ManifestSample*> split(Split split) const;
  // nullptr when no sample has this id.
  const ManifestSample* find(std::string_view id) const;
  // Every caption of every sample, in manifest order (e.g. to train a tokenizer).
  std::vector<std::string> captions() const;
  const std::filesystem::path& file() const { return file_; }

 private:
  std::filesystem::path file_;
  std::vector<ManifestSample> samples_;
  std::unordered_map<std::string, size_t> by_id_;
};

}  // namespace longnet::pipelines
