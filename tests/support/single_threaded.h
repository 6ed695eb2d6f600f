// Test files of tiny tensors include this: torch runs single-threaded in their binary, since intra-op threads only
// add overhead there and on shared CI cores their spinning dominates. Set once, before any test runs.
#pragma once

#include <ATen/Parallel.h>

namespace longnet::test {

inline const bool kSingleThreaded = [] {
  at::set_num_threads(1);
  return true;
}();

}  // namespace longnet::test
