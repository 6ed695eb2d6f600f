// 16-bit GEMMs whose epilogue does the MLP's elementwise work: bias + GELU forward (keeping the pre-activation), the
// GELU derivative with the bias gradient, and a bias gradient reduced from an input. One cuBLASLt matmul each, float32
// accumulation; the epilogue's GELU is the tanh approximation. For fusion/gelu_mlp.cpp: CUDA and the standard library
// only (the handle, workspace and stream come from the caller).
//
// Matrices are column-major as cuBLAS sees them: D (m × n, leading dimension ldd) = op(A) (m × k) · op(B) (k × n).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "attention/kernels/params.h"

typedef struct cublasLtContext* cublasLtHandle_t;

namespace longnet::fusion::kernels {

using attention::kernels::ElementType;

enum class GemmEpilogue {
  bias_gelu_aux,  // D = gelu(A·B + bias), aux = A·B + bias; bias has m elements (read)
  dgelu,          // D = (A·B) ⊙ gelu'(aux); no bias
  dgelu_bgrad,    // dgelu, and bias (m elements, written) = the sum of D over its n columns
  bgradb,         // D = A·B; bias (n elements, written) = the sum of op(B) over k (B must be transposed)
};

struct GemmEpilogueParams {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
  GemmEpilogue epilogue = GemmEpilogue::bias_gelu_aux;
  bool transpose_a = false, transpose_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;  // (m × k), or (k × m) stored when transpose_a
  int64_t lda = 0;
  const void* b = nullptr;  // (k × n), or (n × k) stored when transpose_b
  int64_t ldb = 0;
  void* d = nullptr;        // (m × n)
  int64_t ldd = 0;
  void* aux = nullptr;      // (m × n), leading dimension ldd: the pre-activation (the GELU epilogues)
  void* bias = nullptr;     // see GemmEpilogue; `dtype`; unused by dgelu
  ElementType dtype = ElementType::bfloat16;  // of A, B, D, aux and bias: float16 or bfloat16
};

// Throws std::invalid_argument for a bad dtype, null pointers, sizes below 1, leading dimensions that do not cover
// their matrices or are not multiples of 8, and std::runtime_error naming the cuBLASLt status when the library has no
// algorithm for the problem or the matmul fails.
void launch_gemm_epilogue(const GemmEpilogueParams& params);

}  // namespace longnet::fusion::kernels
