// Host launcher of the grad_gather kernel (see GradGatherParams in params.h for the exact semantics).
#pragma once

#include "attention/kernels/params.h"

namespace longnet::attention::kernels {

// Whether a call's gradients can be read as 16-byte vectors (aligned pointers, strides in whole vectors). The
// launcher reads the calls from device memory, so the host tells it with `calls_vectorizable`: all of them can.
bool grad_call_vectorizable(const GradCall& call, ElementType dtype);

// Validates the params (non-null pointers, head_dim > 0, heads a multiple of group, non-negative sizes) and launches
// on params.stream. Throws std::runtime_error naming the file, line and CUDA error when a launch fails. An empty
// output does nothing.
void launch_grad_gather(const GradGatherParams& params, bool calls_vectorizable);

}  // namespace longnet::attention::kernels
