#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace {
std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
fs::path scratch(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("longnet_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}
}  // namespace

TEST_CASE("write_file_atomic replaces the file and leaves no temporary behind", "[core][cpu]") {
  const auto dir = scratch("atomic");
  const auto file = dir / "sub" / "x.txt";
  longnet::write_file_atomic(file, "first");
  longnet::write_file_atomic(file, "second");
  CHECK(slurp(file) == "second");
  int entries = 0;
  for ([[maybe_unused]] auto& e : fs::directory_iterator(file.parent_path())) ++entries;
  CHECK(entries == 1);
  fs::remove_all(dir);
}

TEST_CASE("write_file_atomic failure keeps the old file and names the path", "[core][cpu]") {
  const auto dir = scratch("atomic_fail");
  const auto file = dir / "keep.txt";
  longnet::write_file_atomic(file, "precious");
  // A directory where the temporary file should go cannot be written: the old contents must survive.
  const auto blocked = dir / "blocked";
  fs::create_directories(blocked / "f.txt");
  try {
    longnet::write_file_atomic(blocked / "f.txt", "new");
    FAIL("expected an IoError");
  } catch (const longnet::IoError& e) {
    CHECK_THAT(e.what(), Catch::Contains("f.txt"));
  }
  CHECK(slurp(file) == "precious");
  CHECK(fs::is_directory(blocked / "f.txt"));
  fs::remove_all(dir);
}
