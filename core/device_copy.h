// longnet::to_device_async: a small host tensor (row indices, flags) on a device without making the host wait.
// Header-only (the compiled core has no torch); for the torch libraries.
//
// A copy to a CUDA device from pageable memory waits for the work queued before it, even with non_blocking; from
// pinned memory it is queued like a kernel. The tensor is first copied into a fresh pinned buffer (torch's caching host
// allocator keeps it until the copy is done), so the caller may reuse or free its own tensor at once.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace longnet {

// `host` on `device`: to a CUDA device, a non-blocking copy from a fresh pinned buffer; otherwise `host.to(device)`
// (the tensor itself when it is already there).
inline at::Tensor to_device_async(const at::Tensor& host, at::Device device) {
  if (!host.is_cpu() || !device.is_cuda()) return host.to(device);
  at::Tensor pinned = at::empty(host.sizes(), host.options().pinned_memory(true));
  pinned.copy_(host);
  return pinned.to(device, /*non_blocking=*/true);
}

}  // namespace longnet
