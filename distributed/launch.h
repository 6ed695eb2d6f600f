// Single-host launcher: runs this program once per rank, the way torchrun would, for `longnet run --nproc N`, the
// distributed tests and the sequence-parallel benchmark.
//
// Every rank is a fresh process (fork, then exec of /proc/self/exe with the same arguments), so nothing of torch is
// ever forked. Rank k gets RANK=k, LOCAL_RANK=k, WORLD_SIZE=N, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT, plus
// the extra variables given. Rank 0 keeps the terminal; the lines of the other ranks are prefixed with "[rank k] "
// (or dropped when quiet). When a rank fails (non-zero exit or a signal) the others are killed, since they would
// wait on it forever. Returns 0 when every rank exits 0, else the first failing rank's status (128 + signal for
// a signal).
//
// Usage:
//   if (!std::getenv("RANK")) return distributed::spawn_local_ranks({.nproc = 4}, argc, argv);
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace longnet::distributed {

struct SpawnOptions {
  int nproc = 1;
  bool quiet_other_ranks = false;                           // drop the output of ranks > 0
  std::vector<std::pair<std::string, std::string>> extra;  // more environment variables for every rank
  std::vector<std::string> drop_arguments;                  // arguments (with their values) not passed to the ranks
};

// argv: this program's arguments (argv[0] included); arguments listed in drop_arguments are removed with the value
// that follows them ("--nproc 4") or joined to them ("--nproc=4").
int spawn_local_ranks(const SpawnOptions& options, int argc, char** argv);

// A TCP port on the loopback interface that no socket holds at the moment of the call.
int free_port();

}  // namespace longnet::distributed
