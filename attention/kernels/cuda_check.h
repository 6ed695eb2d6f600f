// LONGNET_CUDA_CHECK(expr): throws std::runtime_error naming the file, line, expression and CUDA error when a CUDA
// runtime call fails. For the kernels' host launchers (CUDA runtime and the standard library only).
#pragma once

#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#define LONGNET_CUDA_CHECK(expr)                                                                             \
  do {                                                                                                       \
    const cudaError_t longnet_err_ = (expr);                                                                 \
    if (longnet_err_ != cudaSuccess) {                                                                       \
      throw std::runtime_error(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " + #expr + ": " + \
                               cudaGetErrorName(longnet_err_) + ": " + cudaGetErrorString(longnet_err_));    \
    }                                                                                                        \
  } while (0)
