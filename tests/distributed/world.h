// The world of ranks a distributed_tests process belongs to (distributed/launch.h starts them): one rendezvous store
// and the world group, made on first use and kept for the whole run. A process started without the launch variables
// is a world of one (an in-memory store).
#pragma once

#include <string>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "distributed/process_group.h"

namespace longnet::test {

struct World {
  c10::intrusive_ptr<c10d::Store> store;
  distributed::ProcessGroup group;  // every rank
  int rank = 0;
  int size = 1;
};

const World& world();

// Groups of the world split into sequence × data groups of `sequence_size` (distributed::make_process_groups), under
// their own store prefix `name` so that several splits can coexist.
distributed::ProcessGroups split_world(const std::string& name, int sequence_size);

}  // namespace longnet::test
