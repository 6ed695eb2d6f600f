// Data parallelism: gradients summed over a process group in buckets (25 MiB by default), each bucket's all-reduce
// launched from gradient hooks as soon as its last gradient arrives, so that communication overlaps the rest of the
// backward; finish() waits and writes the averaged gradients back into .grad.
//
// Buckets hold parameters in reverse registration order (the order a backward produces their gradients) and are
// launched strictly in bucket order, so every rank issues the same collectives in the same order. With sequence
// parallelism inside data parallelism, reduce over the whole world (sequence ranks hold partial gradients of the same
// samples, which add up) and divide by the data-parallel size only (divide_by).
//
// Usage:
//   GradientAllReduce sync(model->parameters(), groups.world, {.divide_by = groups.data.size()});
//   for (micro = 0; micro < accumulation; ++micro) {
//     if (micro + 1 == accumulation) sync.arm();  // only the last backward of a step communicates
//     loss.backward();
//   }
//   sync.finish();  // p.grad = Σ_ranks p.grad / divide_by
//   optimizer.step();
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "distributed/process_group.h"

namespace longnet::distributed {

struct GradientAllReduceOptions {
  int64_t bucket_bytes = int64_t{25} << 20;
  double divide_by = 0;  // 0: the group's size (a plain average)
};

class GradientAllReduce {
 public:
  // Registers one hook per parameter that requires grad. `group` and `stats` must outlive this object.
  GradientAllReduce(std::vector<at::Tensor> parameters, const ProcessGroup& group,
                    GradientAllReduceOptions options = {}, CommStats* stats = nullptr);
  ~GradientAllReduce();
  GradientAllReduce(const GradientAllReduce&) = delete;
  GradientAllReduce& operator=(const GradientAllReduce&) = delete;

  // The next backward fills the buckets (and launches their all-reduces); before it, gradients accumulate locally.
  void arm();
  // Launches the buckets the backward left incomplete (parameters that got no gradient contribute their current
  // .grad, or zeros), waits for every all-reduce, and sets each .grad to the sum over ranks / divide_by. Disarms.
  void finish();

  int64_t buckets() const { return static_cast<int64_t>(buckets_.size()); }

 private:
  struct Bucket {
    std::vector<size_t> members;  // parameter indices
    at::Tensor flat;              // the gradients of the members, back to back
    size_t pending = 0;           // members whose gradient has not arrived in this backward
    bool launched = false;
    c10::intrusive_ptr<c10d::Work> work;
  };

  void on_gradient(size_t index, const at::Tensor& grad);
  void launch_ready();  // launches ready buckets in order, from the first not yet launched
  void reset();

  std::vector<at::Tensor> params_;
  std::vector<unsigned> hooks_;
  std::vector<size_t> bucket_of_;
  std::vector<int64_t> offset_;
  std::vector<bool> arrived_;
  std::vector<Bucket> buckets_;
  size_t next_launch_ = 0;
  bool armed_ = false;
  ProcessGroup group_;
  GradientAllReduceOptions options_;
  CommStats* stats_ = nullptr;
};

// The rows of every rank, in rank order: (size·B, ...) from this rank's (B, ...) (B equal on every rank), for a loss
// over the global batch such as a contrastive one (every sample of every rank a negative for every other). Every
// rank computes the same loss over the gathered rows, so each already holds the whole gradient of its own rows: the
// backward passes back the slice of this rank and communicates nothing. Sum the parameters' gradients over ranks
// (GradientAllReduce with divide_by = 1) to get the gradient of that loss; a parameter every rank uses directly in
// the loss (a learned temperature) already has it whole on each rank. A group of one returns x.
at::Tensor gather_rows(const at::Tensor& x, const ProcessGroup& group);

}  // namespace longnet::distributed
