// TensorBoard event files (core/tensorboard.h), read back by the tensorboard Python package.
#include "core/tensorboard.h"

#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

namespace {

std::string run_and_capture(const std::string& command) {
  std::string out;
  std::FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buffer[4096];
  while (const size_t n = std::fread(buffer, 1, sizeof(buffer), pipe)) out.append(buffer, n);
  REQUIRE(::pclose(pipe) == 0);
  return out;
}

}  // namespace

TEST_CASE("crc32c matches the standard check values", "[core]") {
  CHECK(longnet::crc32c("123456789") == 0xE3069283u);  // the CRC-32C check value
  CHECK(longnet::crc32c("") == 0u);
  CHECK(longnet::crc32c(std::string(32, '\0')) == 0x8A9136AAu);  // RFC 3720 B.4: 32 bytes of zeros
}

TEST_CASE("TensorBoard reads back the scalars we write", "[core]") {
  longnet::test::TempDir tmp;
  const auto dir = tmp.path() / "tb";
  {
    longnet::TensorBoardWriter tb(dir);
    for (int64_t step = 0; step < 5; ++step) {
      tb.add_scalar("train/loss", 3.0 - 0.5 * static_cast<double>(step), step * 10);
      if (step % 2 == 0) tb.add_scalar("eval/bits_per_byte", 1.25 + static_cast<double>(step), step * 10);
    }
    tb.flush();
  }
  const auto json = nlohmann::json::parse(run_and_capture(std::string(LONGNET_TEST_PYTHON) +
                                                          " tests/core/read_tensorboard.py '" + dir.string() + "'"));
  REQUIRE(json.contains("train/loss"));
  REQUIRE(json["train/loss"].size() == 5);
  for (int64_t step = 0; step < 5; ++step) {
    CHECK(json["train/loss"][step][0].get<int64_t>() == step * 10);
    CHECK(json["train/loss"][step][1].get<double>() == Approx(3.0 - 0.5 * static_cast<double>(step)));
  }
  REQUIRE(json["eval/bits_per_byte"].size() == 3);
  CHECK(json["eval/bits_per_byte"][2][1].get<double>() == Approx(5.25));
}

TEST_CASE("TensorBoardWriter names the folder it cannot create", "[core]") {
  longnet::test::TempDir tmp;
  const auto blocker = tmp.path() / "file";
  std::FILE* f = std::fopen(blocker.c_str(), "w");
  REQUIRE(f != nullptr);
  std::fclose(f);
  CHECK_THROWS_AS(longnet::TensorBoardWriter(blocker / "tb"), longnet::IoError);
  CHECK_THROWS_WITH(longnet::TensorBoardWriter(blocker / "tb"), Catch::Contains(blocker.string()));
}
