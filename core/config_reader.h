// Reading TOML experiment files into typed structs, with errors that point at the file, line and column.
//
//   auto doc = config::Document::load("experiments/quickstart.toml", {"train.steps=10"});
//   config::Section attn = doc.root().section("attention");
//   cfg.causal = attn.boolean("causal", false);
//   attn.finish();  // any key nobody asked for is an error, with a "did you mean"
//
// `base = "other.toml"` at the top of a file inherits that file (relative to the including file; tables merge
// key by key, the including file wins; cycles are errors). Overrides ("key.path=value", as `--set` passes them) are
// applied after inheritance; a value is read as TOML when it parses as one and as a plain string otherwise, and is
// then checked against the type of the key it sets. Every error is a ConfigError whose message starts with the
// place it refers to ("file:line:col" or "--set key=value"). Not thread-safe; read once at start-up.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <toml++/toml.h>

namespace longnet::config {

class Section;

class Document {
 public:
  static Document load(const std::filesystem::path& file, const std::vector<std::string>& overrides = {});
  static Document parse(std::string_view text, const std::string& source_name,
                        const std::vector<std::string>& overrides = {});

  Section root() const;
  const std::filesystem::path& file() const { return file_; }
  // The merged table (inheritance and overrides applied, `base` removed).
  const toml::table& table() const { return *table_; }

 private:
  friend class Section;
  std::filesystem::path file_;
  std::shared_ptr<toml::table> table_;
  std::map<std::string, std::string> override_text_;  // dotted key -> "key=value" as given
};

class Section {
 public:
  // Required values: a missing key is an error.
  bool boolean(std::string_view key) const;
  int64_t integer(std::string_view key) const;
  double number(std::string_view key) const;  // integers are accepted as numbers; nan and inf are errors
  std::string string(std::string_view key) const;

  // Optional values with the default used when the key is absent.
  bool boolean(std::string_view key, bool fallback) const;
  int64_t integer(std::string_view key, int64_t fallback) const;
  double number(std::string_view key, double fallback) const;
  std::string string(std::string_view key, std::string fallback) const;
  std::vector<int64_t> integer_list(std::string_view key, std::vector<int64_t> fallback) const;
  std::vector<double> number_list(std::string_view key, std::vector<double> fallback) const;
  std::vector<std::string> string_list(std::string_view key, std::vector<std::string> fallback) const;
  // A string that must be one of `allowed`.
  std::string choice(std::string_view key, std::string fallback, const std::vector<std::string>& allowed) const;

  bool has(std::string_view key) const;
  // A sub-table; absent means empty (all defaults). A non-table value there is an error.
  Section section(std::string_view key) const;
  // An array of tables (`sources = [{...}, {...}]` or [[data.sources]]); absent means none. Each element is a
  // Section named "<key>[i]" with its own unknown-key check.
  std::vector<Section> table_list(std::string_view key) const;
  // Keys of this table that are sub-tables (for open sets such as [modalities.*]).
  std::vector<std::string> table_keys() const;

  // Rejects every key of this table that no accessor asked for, naming the closest valid key.
  void finish() const;

  // Throws a ConfigError located at `key` (or at element `index` of the list at `key`).
  [[noreturn]] void fail(std::string_view key, const std::string& message) const;
  [[noreturn]] void fail_element(std::string_view key, size_t index, const std::string& message) const;

  std::string dotted(std::string_view key) const;
  const std::string& path() const { return path_; }

 private:
  friend class Document;
  Section(const Document* doc, const toml::table* table, std::string path, toml::source_region where);
  const toml::node* lookup(std::string_view key) const;
  const toml::node* require_node(std::string_view key) const;
  std::string where_key(std::string_view key) const;
  std::string where_node(std::string_view key, const toml::node& node) const;

  const Document* doc_;
  const toml::table* table_;  // may be null: an absent section
  std::string path_;
  toml::source_region where_;
  mutable std::shared_ptr<std::set<std::string, std::less<>>> used_;
};

// Levenshtein distance; used for "did you mean" suggestions.
size_t edit_distance(std::string_view a, std::string_view b);
// The candidate closest to `word`, if it is close enough to be a plausible typo, else the shortest candidate that
// contains `word` (a shortened name such as "warmup" for "warmup_steps").
std::optional<std::string> closest_match(std::string_view word, const std::vector<std::string>& candidates);

// Checks shared by every table: ConfigError at `key` unless value >= min ("must be >= min, got value").
void at_least(const Section& s, std::string_view key, int64_t value, int64_t min);
// A dilated-attention pattern ([attention], [fusion], [modalities.*]): reads segment_lengths and dilation_rates
// (defaults: the values passed in) and requires one rate per length, each >= 1, and every rate dividing its length.
void read_dilated_pattern(const Section& s, std::vector<int64_t>& segment_lengths,
                          std::vector<int64_t>& dilation_rates);

}  // namespace longnet::config
