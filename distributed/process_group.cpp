// Compiled with USE_C10D_GLOO (and USE_C10D_NCCL in CUDA builds) and distributed/gloo_decls on the include path,
// without the precompiled torch header (distributed/CMakeLists.txt): torch's backend headers need those defines.
#include "distributed/process_group.h"

#include <cstdlib>
#include <string>
#include <utility>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LONGNET_WITH_CUDA
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "core/error.h"

namespace longnet::distributed {
namespace {

std::optional<std::string> env_text(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

int env_int(const char* name, int min_value, std::optional<int> fallback) {
  const auto text = env_text(name);
  if (!text) {
    if (fallback) return *fallback;
    throw ConfigError(std::string("environment variable ") + name + " is not set (a distributed launch sets RANK, "
                      "WORLD_SIZE and MASTER_PORT for every rank)");
  }
  size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text->size() || value < min_value) {
    throw ConfigError(std::string("environment variable ") + name + "='" + *text + "' must be an integer >= " +
                      std::to_string(min_value));
  }
  return value;
}

int64_t bytes_of(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace

std::optional<LaunchEnv> launch_env_from_environment() {
  if (!env_text("WORLD_SIZE")) return std::nullopt;
  LaunchEnv env;
  env.world_size = env_int("WORLD_SIZE", 1, std::nullopt);
  env.rank = env_int("RANK", 0, std::nullopt);
  if (env.rank >= env.world_size) {
    throw ConfigError("environment variable RANK=" + std::to_string(env.rank) + " must be < WORLD_SIZE=" +
                      std::to_string(env.world_size));
  }
  env.local_rank = env_int("LOCAL_RANK", 0, env.rank);
  env.master_addr = env_text("MASTER_ADDR").value_or("127.0.0.1");
  env.master_port = env_int("MASTER_PORT", 1, env.world_size == 1 ? std::optional<int>(29500) : std::nullopt);
  if (env.master_port > 65535) {
    throw ConfigError("environment variable MASTER_PORT=" + std::to_string(env.master_port) + " must be <= 65535");
  }
  return env;
}

ProcessGroup::ProcessGroup(c10::intrusive_ptr<c10d::Backend> backend) : backend_(std::move(backend)) {}

int ProcessGroup::rank() const { return backend_ ? backend_->getRank() : 0; }
int ProcessGroup::size() const { return backend_ ? backend_->getSize() : 1; }

void ProcessGroup::all_gather(at::Tensor& out, const at::Tensor& in, CommStats* stats) const {
  if (!backend_ || size() == 1) {
    out.copy_(in.view_as(out));
    return;
  }
  at::Tensor input = in;
  backend_->_allgather_base(out, input)->wait();
  if (stats != nullptr) {
    stats->bytes_sent += bytes_of(in) * (size() - 1);
    stats->bytes_received += bytes_of(in) * (size() - 1);
  }
}

void ProcessGroup::reduce_scatter(at::Tensor& out, const at::Tensor& in, CommStats* stats) const {
  if (!backend_ || size() == 1) {
    out.copy_(in.view_as(out));
    return;
  }
  at::Tensor input = in;
  backend_->_reduce_scatter_base(out, input)->wait();
  if (stats != nullptr) {
    stats->bytes_sent += bytes_of(out) * (size() - 1);
    stats->bytes_received += bytes_of(out) * (size() - 1);
  }
}

c10::intrusive_ptr<c10d::Work> ProcessGroup::all_reduce_async(at::Tensor& tensor, CommStats* stats) const {
  if (!backend_) throw Error("all_reduce_async on a process group without a backend (a world of one needs no call)");
  std::vector<at::Tensor> tensors{tensor};
  if (stats != nullptr && size() > 1) {
    // A ring all-reduce moves 2·(P-1)/P of the tensor through every rank in each direction.
    const int64_t moved = 2 * bytes_of(tensor) * (size() - 1) / size();
    stats->bytes_sent += moved;
    stats->bytes_received += moved;
  }
  return backend_->allreduce(tensors);
}

void ProcessGroup::all_reduce(at::Tensor& tensor, CommStats* stats) const {
  if (!backend_ || size() == 1) return;
  all_reduce_async(tensor, stats)->wait();
}

void ProcessGroup::barrier() const {
  if (backend_ && size() > 1) backend_->barrier()->wait();
}

c10::intrusive_ptr<c10d::Store> connect_store(const LaunchEnv& env, std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(env.master_port);
  options.isServer = env.rank == 0;
  options.numWorkers = static_cast<size_t>(env.world_size);
  options.waitWorkers = true;
  options.timeout = timeout;
  try {
    return c10::make_intrusive<c10d::TCPStore>(env.master_addr, options);
  } catch (const std::exception& e) {
    throw IoError("rank " + std::to_string(env.rank) + " could not " + (env.rank == 0 ? "serve" : "reach") +
                  " the rendezvous store at " + env.master_addr + ":" + std::to_string(env.master_port) + ": " +
                  e.what());
  }
}

ProcessGroup make_group(const c10::intrusive_ptr<c10d::Store>& store, const std::string& name, int rank, int size,
                        c10::DeviceType device, std::chrono::milliseconds timeout) {
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("longnet/" + name, store);
  if (device == c10::DeviceType::CUDA) {
#ifdef LONGNET_WITH_CUDA
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    return ProcessGroup(c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, options));
#else
    throw ConfigError("process group '" + name + "': NCCL groups need a build with LONGNET_CUDA=ON");
#endif
  }
  if (device != c10::DeviceType::CPU) {
    throw ConfigError("process group '" + name + "': no backend for device type " + c10::DeviceTypeName(device));
  }
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  // GLOO_SOCKET_IFNAME picks the interface on multi-host runs (as in torch); otherwise the host name's address, or
  // loopback when it does not resolve.
  if (const auto ifname = env_text("GLOO_SOCKET_IFNAME")) {
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(*ifname));
  } else {
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  options->threads = 2;
  return ProcessGroup(c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, options));
}

ProcessGroups make_process_groups(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
                                  int sequence_size, c10::DeviceType device, std::chrono::milliseconds timeout) {
  if (sequence_size < 1 || world_size % sequence_size != 0) {
    throw ConfigError("sequence parallel size " + std::to_string(sequence_size) + " must divide the world size " +
                      std::to_string(world_size));
  }
  const int sequence_index = rank / sequence_size, data_index = rank % sequence_size;
  ProcessGroups groups;
  groups.world = make_group(store, "world", rank, world_size, device, timeout);
  groups.sequence = make_group(store, "sequence/" + std::to_string(sequence_index), data_index, sequence_size, device,
                               timeout);
  groups.data = make_group(store, "data/" + std::to_string(data_index), sequence_index, world_size / sequence_size,
                           device, timeout);
  return groups;
}

ProcessGroups make_process_groups(const LaunchEnv& env, int sequence_size, c10::DeviceType device,
                                  std::chrono::milliseconds timeout) {
  return make_process_groups(connect_store(env, timeout), env.rank, env.world_size, sequence_size, device, timeout);
}

}  // namespace longnet::distributed
