// Test fixtures on disk: a fresh folder under the system temporary directory, removed with everything in it at scope
// exit, and reading a file back.
#pragma once

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace longnet::test {

namespace fs = std::filesystem;

// A fresh folder under the system temporary directory, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    // The process id as well: ctest runs test processes side by side, and a folder must be no other process's.
    path_ = fs::temp_directory_path() / ("longnet_test_" + std::to_string(::getpid()) + "_" + std::to_string(stamp) +
                                         "_" + std::to_string(counter.fetch_add(1)));
    fs::create_directories(path_);
  }
  // Not fs::remove_all: the copy of it that libtorch.so exports (and the dynamic linker binds) crashes.
  ~TempDir() {
    std::vector<fs::path> entries;
    for (const auto& e : fs::recursive_directory_iterator(path_)) entries.push_back(e.path());
    std::error_code ec;
    for (auto it = entries.rbegin(); it != entries.rend(); ++it) fs::remove(*it, ec);  // children before parents
    fs::remove(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // Writes `text` to `name` (folders created) and returns its path.
  fs::path write(const std::string& name, const std::string& text) const {
    const fs::path file = path_ / name;
    fs::create_directories(file.parent_path());
    std::ofstream(file, std::ios::binary) << text;
    return file;
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// The whole contents of a file ("" when it cannot be read).
inline std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace longnet::test
