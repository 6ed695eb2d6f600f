#include "tests/distributed/world.h"

#include <chrono>

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

namespace longnet::test {
namespace {

// A rank that fails stops waiting on its peers after this long instead of hanging the test run.
constexpr std::chrono::milliseconds kTimeout = std::chrono::seconds(120);

World make_world() {
  World w;
  if (const auto env = distributed::launch_env_from_environment()) {
    w.rank = env->rank;
    w.size = env->world_size;
    w.store = distributed::connect_store(*env, kTimeout);
  } else {
    w.store = c10::make_intrusive<c10d::HashStore>();
  }
  w.group = distributed::make_group(w.store, "test-world", w.rank, w.size, c10::DeviceType::CPU, kTimeout);
  return w;
}

}  // namespace

const World& world() {
  static const World w = make_world();
  return w;
}

distributed::ProcessGroups split_world(const std::string& name, int sequence_size) {
  const World& w = world();
  auto store = c10::make_intrusive<c10d::PrefixStore>("split/" + name, w.store);
  return distributed::make_process_groups(store, w.rank, w.size, sequence_size, c10::DeviceType::CPU, kTimeout);
}

}  // namespace longnet::test
