// `longnet ls` and `longnet cp`: the experiment files the toolkit ships (experiments/*.toml), listed with what each is
// for and what it is expected to reach, and copied out to be edited:
//
//   longnet ls                                   # name, description, expected result
//   longnet cp quickstart my_run.toml            # then: longnet run my_run.toml
//
// A file's description is the first sentence of its header comment; its expected result, a comment line starting "# expected:".
// The folder is the source tree's experiments/ (LONGNET_EXPERIMENTS overrides it).
#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "apps/longnet/commands.h"
#include "core/atomic_file.h"
#include "core/error.h"

namespace longnet::app {
namespace {
namespace fs = std::filesystem;

fs::path presets_dir() {
  if (const char* env = std::getenv("LONGNET_EXPERIMENTS"); env != nullptr && *env != '\0') return env;
  return LONGNET_EXPERIMENTS_DIR;
}

struct Preset {
  std::string name, description, expected;
  fs::path file;
};

std::string trim(std::string s) {
  const auto b = s.find_first_not_of(" \t");
  const auto e = s.find_last_not_of(" \t\r");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::vector<Preset> list_presets() {
  const fs::path dir = presets_dir();
  if (!fs::is_directory(dir)) {
    throw ConfigError("no experiments folder at '" + dir.string() + "' (set LONGNET_EXPERIMENTS to the folder)");
  }
  std::vector<Preset> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".toml") continue;
    Preset p{e.path().stem().string(), "", "", e.path()};
    std::ifstream in(e.path());
    std::string paragraph;
    bool in_first_paragraph = true;
    for (std::string line; std::getline(in, line);) {
      if (line.rfind('#', 0) != 0) {
        if (!trim(line).empty()) break;  // the header comment ends at the first table or key
        continue;
      }
      const std::string text = trim(line.substr(1));
      if (text.rfind("expected:", 0) == 0) {
        p.expected = trim(text.substr(9));
      } else if (text.empty()) {
        in_first_paragraph = paragraph.empty();
      } else if (in_first_paragraph) {
        paragraph += (paragraph.empty() ? "" : " ") + text;
      }
    }
    // The first sentence of the first paragraph.
    const auto stop = paragraph.find(". ");
    p.description = stop == std::string::npos ? paragraph : paragraph.substr(0, stop + 1);
    out.push_back(std::move(p));
  }
  std::sort(out.begin(), out.end(), [](const Preset& a, const Preset& b) { return a.name < b.name; });
  return out;
}

void print_list() {
  const auto presets = list_presets();
  size_t width = 4;
  for (const auto& p : presets) width = std::max(width, p.name.size());
  for (const auto& p : presets) {
    std::cout << p.name << std::string(width + 2 - p.name.size(), ' ') << p.description << "\n";
    if (!p.expected.empty()) std::cout << std::string(width + 2, ' ') << "expected: " << p.expected << "\n";
  }
}

struct CopyArgs {
  std::string name, file;
  bool force = false;
};

void copy_preset(const CopyArgs& a) {
  const auto presets = list_presets();
  const std::string wanted = fs::path(a.name).extension() == ".toml" ? fs::path(a.name).stem().string() : a.name;
  const auto it = std::find_if(presets.begin(), presets.end(), [&](const Preset& p) { return p.name == wanted; });
  if (it == presets.end()) {
    std::string names;
    for (const auto& p : presets) names += (names.empty() ? "" : ", ") + p.name;
    throw ConfigError("cp: no experiment named \"" + a.name + "\" (shipped: " + names + ")");
  }
  if (fs::exists(a.file) && !a.force) {
    throw ConfigError("cp: '" + a.file + "' exists; pass --force to overwrite it");
  }
  std::ifstream in(it->file, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  std::string contents = text.str();
  // A `base = "x.toml"` of the shipped file is relative to experiments/: keep it pointing there.
  const std::string key = "base = \"";
  if (const auto pos = contents.find(key); pos != std::string::npos && (pos == 0 || contents[pos - 1] == '\n')) {
    const auto end = contents.find('"', pos + key.size());
    const std::string base = contents.substr(pos + key.size(), end - pos - key.size());
    if (fs::path(base).is_relative()) {
      contents.replace(pos + key.size(), base.size(), fs::absolute(presets_dir() / base).lexically_normal().string());
    }
  }
  write_file_atomic(a.file, contents);
  std::cout << "copied " << it->file.string() << " to " << a.file << "\n";
}

}  // namespace

void add_preset_commands(CLI::App& app) {
  CLI::App* ls = app.add_subcommand("ls", "List the shipped experiment files with their purpose and expected results");
  ls->callback([] { print_list(); });

  auto c = std::make_shared<CopyArgs>();
  CLI::App* cp = app.add_subcommand("cp", "Copy a shipped experiment file to edit it");
  cp->add_option("name", c->name, "Experiment name, as `longnet ls` shows it")->required();
  cp->add_option("file", c->file, "Where to write the copy")->required();
  cp->add_flag("--force", c->force, "Overwrite an existing file");
  cp->callback([c] { copy_preset(*c); });
}

}  // namespace longnet::app
