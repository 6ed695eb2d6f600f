// CUDA autocast for the scope of a test: on or off as asked, in the given dtype, and back to the state before
// however the scope ends (a failing check must not leave it on for the tests after it), its cast cache cleared.
#pragma once

#include <ATen/autocast_mode.h>

namespace longnet::test {

class CudaAutocast {
 public:
  explicit CudaAutocast(bool on = true, at::ScalarType dtype = at::kBFloat16)
      : was_on_(at::autocast::is_autocast_enabled(at::kCUDA)), was_dtype_(at::autocast::get_autocast_dtype(at::kCUDA)) {
    at::autocast::set_autocast_enabled(at::kCUDA, on);
    at::autocast::set_autocast_dtype(at::kCUDA, dtype);
  }
  ~CudaAutocast() {
    at::autocast::set_autocast_enabled(at::kCUDA, was_on_);
    at::autocast::set_autocast_dtype(at::kCUDA, was_dtype_);
    at::autocast::clear_cache();
  }
  CudaAutocast(const CudaAutocast&) = delete;
  CudaAutocast& operator=(const CudaAutocast&) = delete;

 private:
  bool was_on_;
  at::ScalarType was_dtype_;
};

}  // namespace longnet::test
