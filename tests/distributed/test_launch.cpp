// distributed::spawn_local_ranks: the rank variables every rank gets, the exit status when a rank fails, and that the
// other ranks are stopped when one dies. The ranks are distributed_tests itself in its `--launch-probe` mode. They run
// in the world of one only (distributed_tests.world1): the launcher does not depend on the world around it.
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "distributed/launch.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

using longnet::distributed::spawn_local_ranks;
using longnet::distributed::SpawnOptions;

namespace {

bool in_world_of_one() {
  const char* world = std::getenv("WORLD_SIZE");
  return world == nullptr || std::string(world) == "1";
}

int spawn_probe(int nproc, const std::string& dir, const std::string& mode) {
  std::vector<std::string> args{"distributed_tests", "--nproc", std::to_string(nproc), "--launch-probe", dir, mode};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  SpawnOptions options;
  options.nproc = nproc;
  options.quiet_other_ranks = true;
  options.drop_arguments = {"--nproc"};
  return spawn_local_ranks(options, static_cast<int>(args.size()), argv.data());
}

}  // namespace

TEST_CASE("spawn_local_ranks gives every rank its variables and one free port") {
  if (!in_world_of_one()) return;
  longnet::test::TempDir dir;
  REQUIRE(spawn_probe(3, dir.path().string(), "ok") == 0);
  std::string port;
  for (int rank = 0; rank < 3; ++rank) {
    const std::string line = longnet::test::read_text(dir.path() / ("rank" + std::to_string(rank)));
    const std::string expected = std::to_string(rank) + " 3 " + std::to_string(rank) + " ";
    REQUIRE(line.rfind(expected, 0) == 0);
    const std::string this_port = line.substr(expected.size());
    if (rank == 0) port = this_port;
    CHECK(this_port == port);
    CHECK(std::stoi(this_port) > 0);
  }
}

TEST_CASE("spawn_local_ranks returns the failing rank's status") {
  if (!in_world_of_one()) return;
  longnet::test::TempDir dir;
  CHECK(spawn_probe(3, dir.path().string(), "fail1") == 3);
}

TEST_CASE("spawn_local_ranks stops the other ranks when one dies") {
  if (!in_world_of_one()) return;
  longnet::test::TempDir dir;
  const auto start = std::chrono::steady_clock::now();
  CHECK(spawn_probe(3, dir.path().string(), "abort1") == 128 + 6);  // SIGABRT
  // The other ranks sleep for a minute unless they are killed.
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(30));
}
