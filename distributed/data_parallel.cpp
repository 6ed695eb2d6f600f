#include "distributed/data_parallel.h"

#include <algorithm>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/torch.h>

#include "core/error.h"

namespace longnet::distributed {

GradientAllReduce::GradientAllReduce(std::vector<at::Tensor> parameters, const ProcessGroup& group,
                                     GradientAllReduceOptions options, CommStats* stats)
    : group_(group), options_(options), stats_(stats) {
  for (auto& p : parameters) {
    if (p.requires_grad()) params_.push_back(p);
  }
  if (options_.divide_by == 0) options_.divide_by = group_.size();
  bucket_of_.assign(params_.size(), 0);
  offset_.assign(params_.size(), 0);
  arrived_.assign(params_.size(), false);
  // Reverse registration order: the last layers' gradients come first in a backward.
  int64_t filled = 0;
  for (size_t n = params_.size(); n-- > 0;) {
    const at::Tensor& p = params_[n];
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    const bool fits = !buckets_.empty() && filled + bytes <= options_.bucket_bytes &&
                      params_[buckets_.back().members.front()].scalar_type() == p.scalar_type() &&
                      params_[buckets_.back().members.front()].device() == p.device();
    if (!fits) {
      buckets_.emplace_back();
      filled = 0;
    }
    bucket_of_[n] = buckets_.size() - 1;
    offset_[n] = filled / static_cast<int64_t>(p.element_size());
    buckets_.back().members.push_back(n);
    filled += bytes;
  }
  for (Bucket& b : buckets_) {
    int64_t numel = 0;
    for (size_t n : b.members) numel += params_[n].numel();
    const at::Tensor& first = params_[b.members.front()];
    b.flat = at::zeros({numel}, first.options().requires_grad(false));
  }
  for (size_t n = 0; n < params_.size(); ++n) {
    hooks_.push_back(params_[n].register_hook([this, n](const at::Tensor& grad) { on_gradient(n, grad); }));
  }
  reset();
}

GradientAllReduce::~GradientAllReduce() {
  for (Bucket& b : buckets_) {
    if (b.work) {
      try {
        b.work->wait();
      } catch (const std::exception&) {
        // A failed collective during teardown: nothing left to report it to.
      }
    }
  }
  for (size_t n = 0; n < params_.size(); ++n) params_[n].remove_hook(hooks_[n]);
}

void GradientAllReduce::reset() {
  for (Bucket& b : buckets_) {
    b.pending = b.members.size();
    b.launched = false;
    b.work.reset();
  }
  std::fill(arrived_.begin(), arrived_.end(), false);
  next_launch_ = 0;
}

void GradientAllReduce::arm() {
  reset();
  armed_ = true;
}

void GradientAllReduce::on_gradient(size_t index, const at::Tensor& grad) {
  if (!armed_ || arrived_[index]) return;
  // The hook runs before autograd adds `grad` into .grad: the bucket gets the accumulated value.
  Bucket& b = buckets_[bucket_of_[index]];
  const at::Tensor& p = params_[index];
  auto slot = b.flat.narrow(0, offset_[index], p.numel()).view(p.sizes());
  torch::NoGradGuard no_grad;
  if (p.grad().defined()) {
    slot.copy_(p.grad() + grad);
  } else {
    slot.copy_(grad);
  }
  arrived_[index] = true;
  if (--b.pending == 0) launch_ready();
}

void GradientAllReduce::launch_ready() {
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    Bucket& b = buckets_[next_launch_++];
    if (group_.size() > 1) b.work = group_.all_reduce_async(b.flat, stats_);
    b.launched = true;
  }
}

void GradientAllReduce::finish() {
  if (!armed_) throw Error("GradientAllReduce::finish() without arm() before the backward");
  torch::NoGradGuard no_grad;
  for (Bucket& b : buckets_) {
    if (b.pending == 0) continue;
    for (size_t n : b.members) {
      if (arrived_[n]) continue;
      const at::Tensor& p = params_[n];
      auto slot = b.flat.narrow(0, offset_[n], p.numel()).view(p.sizes());
      if (p.grad().defined()) {
        slot.copy_(p.grad());
      } else {
        slot.zero_();
      }
      arrived_[n] = true;
    }
    b.pending = 0;
  }
  launch_ready();
  for (Bucket& b : buckets_) {
    if (b.work) b.work->wait();
    b.work.reset();
    b.flat.div_(options_.divide_by);
    for (size_t n : b.members) {
      at::Tensor& p = params_[n];
      const auto value = b.flat.narrow(0, offset_[n], p.numel()).view(p.sizes());
      if (p.grad().defined()) {
        p.mutable_grad().copy_(value);
      } else {
        p.mutable_grad() = value.clone();
      }
    }
  }
  armed_ = false;
}

namespace {

class GatherRowsBackward : public torch::autograd::Node {
 public:
  GatherRowsBackward(int64_t start, int64_t rows) : start_(start), rows_(rows) {}
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    return {grads.at(0).narrow(0, start_, rows_)};
  }
  std::string name() const override { return "GatherRowsBackward"; }

 private:
  int64_t start_, rows_;
};

}  // namespace

at::Tensor gather_rows(const at::Tensor& x, const ProcessGroup& group) {
  if (!group.valid() || group.size() <= 1) return x;
  if (x.dim() < 1) throw Error("gather_rows: needs a tensor with a row dimension, got a scalar");
  // Gloo has no bool all-gather: bytes travel instead.
  const bool boolean = x.scalar_type() == at::kBool;
  const at::Tensor in = (boolean ? x.to(at::kByte) : x.detach()).contiguous();
  auto sizes = in.sizes().vec();
  sizes[0] *= group.size();
  at::Tensor out = at::empty(sizes, in.options());
  group.all_gather(out, in);
  if (boolean) return out.to(at::kBool);
  if (torch::autograd::GradMode::is_enabled() && x.requires_grad()) {
    auto node = std::shared_ptr<GatherRowsBackward>(new GatherRowsBackward(group.rank() * x.size(0), x.size(0)),
                                                    torch::autograd::deleteNode);
    node->set_next_edges(torch::autograd::collect_next_edges(x));
    torch::autograd::set_history(out, node);
  }
  return out;
}

}  // namespace longnet::distributed
