#include <catch2/catch.hpp>

#include <filesystem>

#include "core/atomic_file.h"
#include "core/error.h"
#include "tests/support/temp_dir.h"

namespace fs = std::filesystem;
using longnet::test::read_text;
using longnet::test::TempDir;

TEST_CASE("write_file_atomic replaces the file and leaves no temporary behind", "[core][cpu]") {
  const TempDir dir;
  const auto file = dir.path() / "sub" / "x.txt";
  longnet::write_file_atomic(file, "first");
  longnet::write_file_atomic(file, "second");
  CHECK(read_text(file) == "second");
  int entries = 0;
  for ([[maybe_unused]] auto& e : fs::directory_iterator(file.parent_path())) ++entries;
  CHECK(entries == 1);
}

TEST_CASE("write_file_atomic failure keeps the old file and names the path", "[core][cpu]") {
  const TempDir dir;
  const auto file = dir.path() / "keep.txt";
  longnet::write_file_atomic(file, "precious");
  // A directory where the temporary file should go cannot be written: the old contents must survive.
  const auto blocked = dir.path() / "blocked";
  fs::create_directories(blocked / "f.txt");
  try {
    longnet::write_file_atomic(blocked / "f.txt", "new");
    FAIL("expected an IoError");
  } catch (const longnet::IoError& e) {
    CHECK_THAT(e.what(), Catch::Contains("f.txt"));
  }
  CHECK(read_text(file) == "precious");
  CHECK(fs::is_directory(blocked / "f.txt"));
}
