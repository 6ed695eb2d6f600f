// Host launcher of the grad_accumulate kernel (see GradAccumulateParams in params.h for the exact semantics).
#pragma once

#include "attention/kernels/params.h"

namespace longnet::attention::kernels {

// Validates the params (non-null pointers, head_dim > 0, non-negative sizes) and launches on params.stream.
// Throws std::runtime_error naming the file, line and CUDA error when a launch fails. A zero-row call does nothing.
void launch_grad_accumulate(const GradAccumulateParams& params);

}  // namespace longnet::attention::kernels
