// Process groups for distributed runs: the launcher variables, a TCPStore rendezvous, Gloo (CPU) or NCCL (CUDA)
// groups over it, and the split of the world into sequence-parallel × data-parallel groups.
//
// Layout of a world of W = S · G ranks (S = sequence_size): the sequence group of rank k holds the S consecutive ranks
// [S·floor(k/S), S·floor(k/S) + S) (one sample's sequence is split among them); its data group holds the G ranks with
// the same k mod S (they see different batches and average their gradients).
//
// Usage:
//   auto env = launch_env_from_environment();             // RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
//   if (env) {
//     auto groups = make_process_groups(*env, /*sequence_size=*/2, torch::kCPU);
//     groups.sequence.all_gather(gathered, local);         // (S·n, ...) <- (n, ...)
//   }
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace longnet::distributed {

// The variables torchrun and `longnet run --nproc` set for every rank.
struct LaunchEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};

// nullopt when WORLD_SIZE is unset; throws ConfigError naming the variable when one is missing or malformed
// (RANK and MASTER_PORT are required once WORLD_SIZE is set; LOCAL_RANK defaults to RANK, MASTER_ADDR to 127.0.0.1).
std::optional<LaunchEnv> launch_env_from_environment();

// Bytes a rank exchanged through a group (counted by the callers of the collectives below, from tensor sizes).
struct CommStats {
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
};

// One c10d backend (Gloo or NCCL) with the collectives the toolkit uses. Copyable handle; collectives must be
// called in the same order on every rank of the group.
class ProcessGroup {
 public:
  ProcessGroup() = default;
  explicit ProcessGroup(c10::intrusive_ptr<c10d::Backend> backend);

  int rank() const;
  int size() const;
  bool valid() const { return static_cast<bool>(backend_); }
  const c10::intrusive_ptr<c10d::Backend>& backend() const { return backend_; }

  // out: (size·n, ...) contiguous <- in: (n, ...) contiguous; blocks until done.
  void all_gather(at::Tensor& out, const at::Tensor& in, CommStats* stats = nullptr) const;
  // out: (n, ...) = Σ over ranks of in[rank·n : (rank+1)·n]; in: (size·n, ...) contiguous; blocks until done.
  void reduce_scatter(at::Tensor& out, const at::Tensor& in, CommStats* stats = nullptr) const;
  // Sum over ranks, in place, asynchronous: wait on the returned work before reading the tensor. Needs a backend
  // (all_reduce, the blocking form, is a no-op for a default-constructed group of one).
  c10::intrusive_ptr<c10d::Work> all_reduce_async(at::Tensor& tensor, CommStats* stats = nullptr) const;
  void all_reduce(at::Tensor& tensor, CommStats* stats = nullptr) const;
  void barrier() const;

 private:
  c10::intrusive_ptr<c10d::Backend> backend_;
};

// The TCPStore of a launch: rank 0 serves it at MASTER_ADDR:MASTER_PORT, every rank connects.
c10::intrusive_ptr<c10d::Store> connect_store(const LaunchEnv& env,
                                              std::chrono::milliseconds timeout = std::chrono::minutes(5));

// A group of `size` ranks over `store` (namespaced by `name`, so that several groups share one store): Gloo for
// kCPU, NCCL for kCUDA (a build with LONGNET_WITH_CUDA). Every member must call it with the same name and size.
ProcessGroup make_group(const c10::intrusive_ptr<c10d::Store>& store, const std::string& name, int rank, int size,
                        c10::DeviceType device, std::chrono::milliseconds timeout = std::chrono::minutes(5));

struct ProcessGroups {
  ProcessGroup world;
  ProcessGroup sequence;  // ranks that split one sequence
  ProcessGroup data;      // ranks that average gradients
};

// The world group and its split into sequence × data groups (see the layout above). sequence_size must divide
// world_size (ConfigError otherwise).
ProcessGroups make_process_groups(const LaunchEnv& env, int sequence_size, c10::DeviceType device,
                                  std::chrono::milliseconds timeout = std::chrono::minutes(5));
ProcessGroups make_process_groups(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
                                  int sequence_size, c10::DeviceType device,
                                  std::chrono::milliseconds timeout = std::chrono::minutes(5));

}  // namespace longnet::distributed
