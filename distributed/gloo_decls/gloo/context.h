// Declarations of the Gloo types that torch's ProcessGroupGloo.hpp names. The torch wheel compiles Gloo into
// libtorch_cpu.so but ships no Gloo headers; the toolkit only holds these types through shared_ptr/unique_ptr, so
// declarations without layout are all process_group.cpp needs to construct torch's Gloo backend.
#pragma once

#include <chrono>

namespace gloo {

// Only the members ProcessGroupGloo.hpp calls in its inline functions (defined in libtorch_cpu.so).
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};

}  // namespace gloo
