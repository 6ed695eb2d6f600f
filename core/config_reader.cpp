#include "core/config_reader.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace longnet::config {
namespace fs = std::filesystem;

namespace {

std::string format_region(const toml::source_region& region, const fs::path& fallback_file) {
  std::string file = region.path ? std::string(*region.path) : fallback_file.string();
  if (region.begin.line == 0) return file;
  return file + ":" + std::to_string(region.begin.line) + ":" + std::to_string(region.begin.column);
}

std::string describe(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a floating-point number";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::array: return "an array";
    case toml::node_type::table: return "a table";
    default: return "a date/time";
  }
}

std::string non_finite_text(double x) { return std::isnan(x) ? "nan" : x > 0 ? "inf" : "-inf"; }

std::string trim(std::string_view s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) return {};
  const auto e = s.find_last_not_of(" \t");
  return std::string(s.substr(b, e - b + 1));
}

// Fills `dst` (the including file) with what `base` defines and `dst` does not; tables merge key by key and `dst`
// wins. Nodes are moved, not copied: toml++ drops the source position of a copied node, and every error message
// needs it.
void merge_base_into(toml::table& dst, toml::table&& base) {
  for (auto&& [key, value] : base) {
    toml::node* existing = dst.get(key.str());
    if (!existing) {
      value.visit([&, &k = key](auto&& n) { dst.insert(k, std::move(n)); });
    } else if (existing->is_table() && value.is_table()) {
      merge_base_into(*existing->as_table(), std::move(*value.as_table()));
    }
  }
}

toml::table parse_text(std::string_view text, const std::string& source_name) {
  try {
    return toml::parse(text, source_name);
  } catch (const toml::parse_error& e) {
    throw ConfigError(format_region(e.source(), source_name) + ": TOML syntax error: " +
                      std::string(e.description()));
  }
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in || fs::is_directory(path)) {
    throw ConfigError(path.string() + ": cannot read config file" + (fs::exists(path) ? "" : " (no such file)"));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Loads `file` with its `base` chain resolved; `chain` holds the files that include it (for cycle detection).
toml::table load_with_bases(const fs::path& file, std::vector<fs::path>& chain) {
  const fs::path canonical = fs::weakly_canonical(file);
  toml::table table = parse_text(read_file(file), file.string());
  toml::node* base = table.get("base");
  if (!base) return table;

  const std::string where = format_region(base->source(), file) + ": ";
  if (!base->is_string()) {
    throw ConfigError(where + "'base' must be a string (a path to a TOML file), got " + describe(*base));
  }
  // Relative to the including file, so that a config and its base can move together.
  const fs::path base_path = file.parent_path() / std::string(*base->value<std::string>());
  if (!fs::is_regular_file(base_path)) {
    throw ConfigError(where + "'base' must name an existing TOML file, got '" + base_path.string() + "'");
  }
  const fs::path base_canonical = fs::weakly_canonical(base_path);
  chain.push_back(canonical);
  if (std::find(chain.begin(), chain.end(), base_canonical) != chain.end()) {
    std::string cycle;
    for (const auto& p : chain) cycle += p.filename().string() + " -> ";
    throw ConfigError(where + "'base' forms an inheritance cycle: " + cycle + base_canonical.filename().string());
  }
  toml::table inherited = load_with_bases(base_path, chain);
  chain.pop_back();
  table.erase("base");
  merge_base_into(table, std::move(inherited));
  return table;
}

void apply_override(toml::table& root, const std::string& text, std::map<std::string, std::string>& record) {
  const std::string where = "--set " + text + ": ";
  const auto eq = text.find('=');
  if (eq == std::string::npos) throw ConfigError(where + "expected key.path=value");
  const std::string key = trim(std::string_view(text).substr(0, eq));
  const std::string value = trim(std::string_view(text).substr(eq + 1));
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string part; std::getline(ss, part, '.');) parts.push_back(part);
  if (key.empty() || key.back() == '.' || std::any_of(parts.begin(), parts.end(), [](auto& p) { return p.empty(); })) {
    throw ConfigError(where + "expected key.path=value with a dotted key such as train.steps");
  }
  if (parts.front() == "base") throw ConfigError(where + "'base' cannot be overridden");

  toml::table* table = &root;
  std::string prefix;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    prefix += (i ? "." : "") + parts[i];
    toml::node* next = table->get(parts[i]);
    if (!next) {
      table->insert(parts[i], toml::table{});
      next = table->get(parts[i]);
    }
    if (!next->is_table()) throw ConfigError(where + "'" + prefix + "' is not a table");
    table = next->as_table();
  }
  toml::table parsed;
  bool as_toml = true;
  try {
    parsed = toml::parse("v = " + value);
  } catch (const toml::parse_error&) {
    as_toml = false;
  }
  if (as_toml) {
    parsed.get("v")->visit([&](auto&& n) { table->insert_or_assign(parts.back(), n); });
  } else {
    table->insert_or_assign(parts.back(), value);
  }
  record[key] = text;
}

}  // namespace

// ---- Document ---------------------------------------------------------------------------------------------------

Document Document::load(const fs::path& file, const std::vector<std::string>& overrides) {
  Document doc;
  doc.file_ = file;
  std::vector<fs::path> chain;
  doc.table_ = std::make_shared<toml::table>(load_with_bases(file, chain));
  for (const auto& o : overrides) apply_override(*doc.table_, o, doc.override_text_);
  return doc;
}

Document Document::parse(std::string_view text, const std::string& source_name,
                         const std::vector<std::string>& overrides) {
  Document doc;
  doc.file_ = source_name;
  doc.table_ = std::make_shared<toml::table>(parse_text(text, source_name));
  if (doc.table_->get("base")) {
    throw ConfigError(format_region(doc.table_->get("base")->source(), source_name) +
                      ": 'base' needs the config to be read from a file (its path is relative to that file)");
  }
  for (const auto& o : overrides) apply_override(*doc.table_, o, doc.override_text_);
  return doc;
}

Section Document::root() const { return Section(this, table_.get(), "", table_->source()); }

// ---- Section ----------------------------------------------------------------------------------------------------

Section::Section(const Document* doc, const toml::table* table, std::string path, toml::source_region where)
    : doc_(doc), table_(table), path_(std::move(path)), where_(where),
      used_(std::make_shared<std::set<std::string, std::less<>>>()) {}

std::string Section::dotted(std::string_view key) const {
  return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
}

const toml::node* Section::lookup(std::string_view key) const {
  used_->emplace(key);
  return table_ ? table_->get(key) : nullptr;
}

bool Section::has(std::string_view key) const { return table_ && table_->get(key) != nullptr; }

std::string Section::where_node(std::string_view key, const toml::node& node) const {
  const std::string d = dotted(key);
  for (const auto& [k, text] : doc_->override_text_) {
    // The override set this key, a key below it (creating the table), or a table above it.
    if (k == d || k.rfind(d + ".", 0) == 0 || d.rfind(k + ".", 0) == 0) return "--set " + text;
  }
  return format_region(node.source(), doc_->file_);
}

std::string Section::where_key(std::string_view key) const {
  if (const toml::node* n = table_ ? table_->get(key) : nullptr) return where_node(key, *n);
  return format_region(where_, doc_->file_);
}

void Section::fail(std::string_view key, const std::string& message) const {
  throw ConfigError(where_key(key) + ": '" + dotted(key) + "' " + message);
}

void Section::fail_element(std::string_view key, size_t index, const std::string& message) const {
  std::string where = where_key(key);
  if (const toml::node* n = table_ ? table_->get(key) : nullptr; n && n->is_array() && index < n->as_array()->size()) {
    where = where_node(key, *n->as_array()->get(index));
  }
  throw ConfigError(where + ": '" + dotted(key) + "[" + std::to_string(index) + "]' " + message);
}

const toml::node* Section::require_node(std::string_view key) const {
  const toml::node* n = lookup(key);
  if (!n) {
    throw ConfigError(format_region(where_, doc_->file_) + ": missing required key '" + dotted(key) + "'");
  }
  return n;
}

namespace {
// Override values that did not parse as TOML arrive as strings; a string key also takes any override verbatim.
std::optional<std::string> override_value(const std::map<std::string, std::string>& overrides, const std::string& key) {
  const auto it = overrides.find(key);
  if (it == overrides.end()) return std::nullopt;
  return trim(std::string_view(it->second).substr(it->second.find('=') + 1));
}
}  // namespace

bool Section::boolean(std::string_view key) const {
  const toml::node* n = require_node(key);
  if (!n->is_boolean()) fail(key, "must be a boolean (true or false), got " + describe(*n));
  return *n->value<bool>();
}

int64_t Section::integer(std::string_view key) const {
  const toml::node* n = require_node(key);
  if (!n->is_integer()) fail(key, "must be an integer, got " + describe(*n));
  return *n->value<int64_t>();
}

double Section::number(std::string_view key) const {
  const toml::node* n = require_node(key);
  if (!n->is_number()) fail(key, "must be a number, got " + describe(*n));
  const double x = *n->value<double>();
  // nan and inf are valid TOML but no setting of the toolkit means anything by them.
  if (!std::isfinite(x)) fail(key, "must be a finite number, got " + non_finite_text(x));
  return x;
}

std::string Section::string(std::string_view key) const {
  const toml::node* n = require_node(key);
  if (!n->is_string()) {
    if (auto raw = override_value(doc_->override_text_, dotted(key))) return *raw;
    fail(key, "must be a string, got " + describe(*n));
  }
  return std::string(*n->value<std::string>());
}

bool Section::boolean(std::string_view key, bool fallback) const { return lookup(key) ? boolean(key) : fallback; }
int64_t Section::integer(std::string_view key, int64_t fallback) const { return lookup(key) ? integer(key) : fallback; }
double Section::number(std::string_view key, double fallback) const { return lookup(key) ? number(key) : fallback; }
std::string Section::string(std::string_view key, std::string fallback) const {
  return lookup(key) ? string(key) : fallback;
}

std::string Section::choice(std::string_view key, std::string fallback, const std::vector<std::string>& allowed) const {
  const std::string value = string(key, std::move(fallback));
  if (std::find(allowed.begin(), allowed.end(), value) == allowed.end()) {
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + ("\"" + a + "\"");
    std::string hint;
    if (auto m = closest_match(value, allowed)) hint = "; did you mean \"" + *m + "\"?";
    fail(key, "must be one of " + list + ", got \"" + value + "\"" + hint);
  }
  return value;
}

namespace {
template <typename T, typename Check, typename Get>
std::vector<T> read_list(const Section& s, const toml::node* n, std::string_view key, const char* plural,
                         const char* singular, Check check, Get get) {
  if (!n->is_array()) s.fail(key, std::string("must be an array of ") + plural + ", got " + describe(*n));
  std::vector<T> out;
  const toml::array& arr = *n->as_array();
  for (size_t i = 0; i < arr.size(); ++i) {
    if (!check(*arr.get(i))) {
      s.fail_element(key, i, std::string("must be ") + singular + ", got " + describe(*arr.get(i)));
    }
    out.push_back(get(*arr.get(i)));
  }
  return out;
}
}  // namespace

std::vector<int64_t> Section::integer_list(std::string_view key, std::vector<int64_t> fallback) const {
  const toml::node* n = lookup(key);
  if (!n) return fallback;
  return read_list<int64_t>(
      *this, n, key, "integers", "an integer", [](const toml::node& e) { return e.is_integer(); },
      [](const toml::node& e) { return *e.value<int64_t>(); });
}

std::vector<double> Section::number_list(std::string_view key, std::vector<double> fallback) const {
  const toml::node* n = lookup(key);
  if (!n) return fallback;
  const auto out = read_list<double>(
      *this, n, key, "numbers", "a number", [](const toml::node& e) { return e.is_number(); },
      [](const toml::node& e) { return *e.value<double>(); });
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) fail_element(key, i, "must be a finite number, got " + non_finite_text(out[i]));
  }
  return out;
}

std::vector<std::string> Section::string_list(std::string_view key, std::vector<std::string> fallback) const {
  const toml::node* n = lookup(key);
  if (!n) return fallback;
  return read_list<std::string>(
      *this, n, key, "strings", "a string", [](const toml::node& e) { return e.is_string(); },
      [](const toml::node& e) { return std::string(*e.value<std::string>()); });
}

Section Section::section(std::string_view key) const {
  const toml::node* n = lookup(key);
  if (!n) return Section(doc_, nullptr, dotted(key), where_);
  if (!n->is_table()) fail(key, "must be a table, got " + describe(*n));
  return Section(doc_, n->as_table(), dotted(key), n->source());
}

std::vector<Section> Section::table_list(std::string_view key) const {
  std::vector<Section> out;
  const toml::node* n = lookup(key);
  if (!n) return out;
  if (!n->is_array()) fail(key, "must be an array of tables, got " + describe(*n));
  const toml::array& arr = *n->as_array();
  for (size_t i = 0; i < arr.size(); ++i) {
    if (!arr.get(i)->is_table()) fail_element(key, i, "must be a table, got " + describe(*arr.get(i)));
    out.push_back(Section(doc_, arr.get(i)->as_table(), dotted(key) + "[" + std::to_string(i) + "]",
                          arr.get(i)->source()));
  }
  return out;
}

std::vector<std::string> Section::table_keys() const {
  std::vector<std::string> keys;
  if (!table_) return keys;
  for (auto&& [k, v] : *table_) {
    if (v.is_table()) keys.emplace_back(k.str());
  }
  return keys;
}

void Section::finish() const {
  if (!table_) return;
  const toml::key* first = nullptr;
  for (auto&& [k, v] : *table_) {
    if (used_->count(k.str())) continue;
    // Report the unknown key that comes first in the file (overrides, having no position, come last).
    auto pos = [](const toml::key& key) {
      return key.source().begin.line == 0 ? std::pair<uint32_t, uint32_t>{UINT32_MAX, 0}
                                          : std::pair{key.source().begin.line, key.source().begin.column};
    };
    if (!first || pos(k) < pos(*first)) first = &k;
  }
  if (!first) return;
  std::vector<std::string> valid(used_->begin(), used_->end());
  std::string where = where_node(first->str(), *table_->get(first->str()));
  if (first->source().begin.line != 0 && where.rfind("--set", 0) != 0) {
    where = format_region(first->source(), doc_->file_);
  }
  std::string message = where + ": unknown key '" + dotted(first->str()) + "'";
  if (auto m = closest_match(first->str(), valid)) message += "; did you mean '" + *m + "'?";
  if (valid.empty()) {
    message += " (this table takes no keys)";
  } else {
    std::string list;
    for (const auto& v : valid) list += (list.empty() ? "" : ", ") + v;
    message += " (valid keys: " + list + ")";
  }
  throw ConfigError(message);
}

// ---- suggestions ------------------------------------------------------------------------------------------------

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::optional<std::string> closest_match(std::string_view word, const std::vector<std::string>& candidates) {
  std::optional<std::string> best;
  size_t best_distance = std::max<size_t>(2, word.size() / 3) + 1;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(word, c);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  if (best || word.size() < 3) return best;
  // A shortened name ("warmup" for "warmup_steps") is far in edits but plainly meant: take the shortest candidate
  // that contains the word.
  for (const auto& c : candidates) {
    if (c.find(word) != std::string::npos && (!best || c.size() < best->size())) best = c;
  }
  return best;
}

void at_least(const Section& s, std::string_view key, int64_t value, int64_t min) {
  if (value < min) s.fail(key, "must be >= " + std::to_string(min) + ", got " + std::to_string(value));
}

void read_dilated_pattern(const Section& s, std::vector<int64_t>& lengths, std::vector<int64_t>& rates) {
  lengths = s.integer_list("segment_lengths", lengths);
  rates = s.integer_list("dilation_rates", rates);
  if (lengths.empty()) s.fail("segment_lengths", "must list at least one segment length");
  if (lengths.size() != rates.size()) {
    s.fail("dilation_rates", "must have one entry per segment length (" + std::to_string(lengths.size()) +
                                 " segment lengths, " + std::to_string(rates.size()) + " dilation rates)");
  }
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] < 1) s.fail_element("segment_lengths", i, "must be >= 1, got " + std::to_string(lengths[i]));
    if (rates[i] < 1) s.fail_element("dilation_rates", i, "must be >= 1, got " + std::to_string(rates[i]));
    if (lengths[i] % rates[i] != 0) {
      s.fail_element("dilation_rates", i,
                     "must divide its segment length " + std::to_string(lengths[i]) + ", got " +
                         std::to_string(rates[i]));
    }
  }
}

}  // namespace longnet::config
