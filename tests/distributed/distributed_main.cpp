// Test runner of distributed_tests: `distributed_tests --world-size N [catch options]` runs the Catch2 tests in N
// ranks on this host (distributed::spawn_local_ranks: one fresh process per rank, Gloo on loopback) and fails when any
// rank fails; without --world-size the process runs them as a world of one. `--launch-probe DIR MODE` is the
// program test_launch.cpp spawns (see launch_probe).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include <unistd.h>

#include "distributed/launch.h"

namespace {

// One rank of a launcher test: writes "RANK WORLD_SIZE LOCAL_RANK MASTER_PORT" to DIR/rank<RANK>, prints a line, then
// by MODE: "ok" exits 0; "fail1" exits 3 on rank 1; "abort1" aborts on rank 1 while the others sleep for a minute.
int launch_probe(const std::string& dir, const std::string& mode) {
  auto var = [](const char* name) { return std::string(std::getenv(name) ? std::getenv(name) : "-"); };
  const std::string rank = var("RANK");
  std::ofstream(dir + "/rank" + rank) << rank << " " << var("WORLD_SIZE") << " " << var("LOCAL_RANK") << " "
                                      << var("MASTER_PORT") << "\n";
  std::printf("probe line of rank %s\n", rank.c_str());
  std::fflush(stdout);
  if (mode == "fail1" && rank == "1") return 3;
  if (mode == "abort1") {
    if (rank == "1") std::abort();
    ::sleep(60);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "--launch-probe") == 0) return launch_probe(argv[2], argv[3]);
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--world-size") == 0) {
      longnet::distributed::SpawnOptions options;
      options.nproc = std::atoi(argv[i + 1]);
      options.drop_arguments = {"--world-size"};
      return longnet::distributed::spawn_local_ranks(options, argc, argv);
    }
  }
  return Catch::Session().run(argc, argv);
}
