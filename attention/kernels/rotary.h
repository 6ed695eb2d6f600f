// Host launcher of the rotary kernel (see RotaryParams in params.h for the exact semantics).
#pragma once

#include "attention/kernels/params.h"

namespace longnet::attention::kernels {

// Validates the params (non-null pointers, even head_dim >= 2, non-negative sizes) and launches on params.stream.
// Throws std::runtime_error naming the file, line and CUDA error when a launch fails. An empty input does nothing.
void launch_rotary(const RotaryParams& params);

}  // namespace longnet::attention::kernels
