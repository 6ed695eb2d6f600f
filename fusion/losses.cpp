#include "fusion/losses.h"

#include <string>

#include <ATen/ATen.h>

#include "core/device_copy.h"
#include "core/error.h"

namespace longnet::fusion {

at::Tensor info_nce(const at::Tensor& a, const at::Tensor& b, const at::Tensor& temperature, const at::Tensor& both) {
  if (a.dim() != 2 || b.dim() != 2 || a.sizes() != b.sizes()) {
    throw Error("info_nce: a and b must both be (B, E), got " + c10::str(a.sizes()) + " and " + c10::str(b.sizes()));
  }
  if (temperature.numel() != 1) throw Error("info_nce: temperature must be a scalar");
  at::Tensor x = a, y = b;
  if (both.defined()) {
    if (both.dim() != 1 || both.size(0) != a.size(0)) throw Error("info_nce: both must be (B,) bool");
    const at::Tensor rows = to_device_async(both.to(at::kCPU, at::kBool).nonzero().squeeze(1), a.device());
    x = a.index_select(0, rows);
    y = b.index_select(0, rows);
  }
  const int64_t n = x.size(0);
  if (n == 0) return (a.sum() + b.sum()) * 0.0 + temperature.reshape({}) * 0.0;
  const at::Tensor logits = at::matmul(x, y.t()) / temperature.reshape({});
  const at::Tensor targets = at::arange(n, a.options().dtype(at::kLong));
  return (at::cross_entropy_loss(logits, targets) + at::cross_entropy_loss(logits.t(), targets)) / 2.0;
}

at::Tensor info_nce(const at::Tensor& a, const at::Tensor& b, double temperature, const at::Tensor& both) {
  if (!(temperature > 0)) throw Error("info_nce: temperature must be > 0, got " + std::to_string(temperature));
  return info_nce(a, b, at::scalar_tensor(temperature, a.options()), both);
}

}  // namespace longnet::fusion
