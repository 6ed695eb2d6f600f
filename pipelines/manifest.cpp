#include "pipelines/manifest.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/config_reader.h"
#include "core/error.h"

namespace longnet::pipelines {

namespace fs = std::filesystem;

std::string_view split_name(Split split) {
  switch (split) {
    case Split::train:
      return "train";
    case Split::val:
      return "val";
    case Split::test:
      return "test";
  }
  return "?";
}

namespace {

const std::vector<std::string> kKeys = {"id", "split", "video", "audio", "image", "text", "label"};

std::string type_name(const nlohmann::json& v) { return v.type_name(); }

class LineParser {
 public:
  LineParser(const fs::path& file, int line, const ManifestOptions& options)
      : where_(file.string() + ":" + std::to_string(line) + ": "), base_(file.parent_path()), options_(options) {}

  [[noreturn]] void fail(const std::string& message) const { throw DataError(where_ + message); }
  [[noreturn]] void fail_key(const std::string& key, const std::string& message) const {
    fail("key '" + key + "': " + message);
  }

  ManifestSample parse(const std::string& text, int line) const {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
      fail(std::string("not valid JSON (") + e.what() + ")");
    }
    if (!j.is_object()) fail("a sample must be a JSON object, got " + type_name(j));
    for (const auto& [key, value] : j.items()) {
      if (std::find(kKeys.begin(), kKeys.end(), key) == kKeys.end()) {
        std::string hint;
        if (const auto near = config::closest_match(key, kKeys)) hint = " (did you mean '" + *near + "'?)";
        fail_key(key, "unknown key" + hint + "; known keys: id, split, video, audio, image, text, label");
      }
    }

    ManifestSample s;
    s.line = line;
    if (!j.contains("id")) fail_key("id", "missing; every sample needs a unique string id");
    if (!j["id"].is_string() || j["id"].get_ref<const std::string&>().empty()) {
      fail_key("id", "must be a non-empty string, got " + j["id"].dump());
    }
    s.id = j["id"].get<std::string>();

    if (j.contains("split")) {
      const auto& v = j["split"];
      const std::string name = v.is_string() ? v.get<std::string>() : v.dump();
      if (name == "train") {
        s.split = Split::train;
      } else if (name == "val") {
        s.split = Split::val;
      } else if (name == "test") {
        s.split = Split::test;
      } else {
        fail_key("split", "must be \"train\", \"val\" or \"test\", got " + v.dump());
      }
    }

    s.video = path_value(j, "video");
    s.audio = path_value(j, "audio");
    s.image = path_value(j, "image");

    if (j.contains("text")) {
      const auto& v = j["text"];
      if (v.is_string()) {
        s.text.push_back(v.get<std::string>());
      } else if (v.is_array()) {
        if (v.empty()) fail_key("text", "an empty list; leave the key out for a sample without text");
        for (size_t i = 0; i < v.size(); ++i) {
          if (!v[i].is_string()) fail_key("text", "element " + std::to_string(i) + " must be a string, got " + type_name(v[i]));
          s.text.push_back(v[i].get<std::string>());
        }
      } else {
        fail_key("text", "must be a string or a list of strings, got " + type_name(v));
      }
      for (const auto& caption : s.text) {
        if (caption.find_first_not_of(" \t\r\n") == std::string::npos) fail_key("text", "a caption is empty");
      }
    }

    if (j.contains("label")) {
      const auto& v = j["label"];
      if (v.is_number_integer()) {
        s.label_index = v.get<int64_t>();
      } else if (v.is_string() && !v.get_ref<const std::string&>().empty()) {
        s.label_name = v.get<std::string>();
      } else {
        fail_key("label", "must be an integer class index or a non-empty class name, got " + v.dump());
      }
    }

    if (!s.video && !s.audio && !s.image && s.text.empty()) {
      fail("sample '" + s.id + "' is empty: it needs at least one of video, audio, image, text");
    }
    return s;
  }

 private:
  std::optional<fs::path> path_value(const nlohmann::json& j, const std::string& key) const {
    if (!j.contains(key)) return std::nullopt;
    const auto& v = j[key];
    if (!v.is_string()) fail_key(key, "must be a file path (string), got " + type_name(v));
    const std::string& text = v.get_ref<const std::string&>();
    if (text.empty()) fail_key(key, "an empty path; leave the key out for a sample without " + key);
    fs::path p(text);
    if (p.is_relative()) p = base_ / p;
    if (options_.check_files) {
      std::error_code ec;
      if (!fs::is_regular_file(p, ec)) fail_key(key, "file " + p.string() + " does not exist");
    }
    return p;
  }

  std::string where_;
  fs::path base_;
  const ManifestOptions& options_;
};

}  // namespace

Manifest Manifest::load(const fs::path& file, const ManifestOptions& options) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw DataError(file.string() + ": cannot read the manifest (missing or unreadable)");
  std::ostringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), file, options);
}

Manifest Manifest::parse(std::string_view text, const fs::path& file, const ManifestOptions& options) {
  Manifest m;
  m.file_ = file;
  std::istringstream in{std::string(text)};
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const LineParser parser(file, line_no, options);
    ManifestSample s = parser.parse(line, line_no);
    if (const auto it = m.by_id_.find(s.id); it != m.by_id_.end()) {
      parser.fail_key("id", "duplicate id '" + s.id + "' (first on line " +
                                std::to_string(m.samples_[it->second].line) + ")");
    }
    m.by_id_.emplace(s.id, m.samples_.size());
    m.samples_.push_back(std::move(s));
  }
  if (m.samples_.empty()) throw DataError(file.string() + ": the manifest has no samples");
  return m;
}

std::vector<const ManifestSample*> Manifest::split(Split split) const {
  std::vector<const ManifestSample*> out;
  for (const auto& s : samples_) {
    if (s.split == split) out.push_back(&s);
  }
  return out;
}

const ManifestSample* Manifest::find(std::string_view id) const {
  const auto it = by_id_.find(std::string(id));
  return it == by_id_.end() ? nullptr : &samples_[it->second];
}

std::vector<std::string> Manifest::captions() const {
  std::vector<std::string> out;
  for (const auto& s : samples_) out.insert(out.end(), s.text.begin(), s.text.end());
  return out;
}

}  // namespace longnet::pipelines
