#include "fusion/kernels/gemm_epilogue.h"

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include <cublasLt.h>

namespace longnet::fusion::kernels {
namespace {

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("launch_gemm_epilogue: ") + what + ": " + cublasLtGetStatusName(status) +
                             " (" + cublasLtGetStatusString(status) + ")");
  }
}

// Descriptors own their cuBLASLt handles for the length of one call.
struct MatmulDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  MatmulDesc() { check(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate"); }
  ~MatmulDesc() { cublasLtMatmulDescDestroy(desc); }
  MatmulDesc(const MatmulDesc&) = delete;
  MatmulDesc& operator=(const MatmulDesc&) = delete;
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attribute, const T& value) {
    check(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)), "cublasLtMatmulDescSetAttribute");
  }
};

struct Layout {
  cublasLtMatrixLayout_t layout = nullptr;
  Layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    check(cublasLtMatrixLayoutCreate(&layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld),
          "cublasLtMatrixLayoutCreate");
  }
  ~Layout() { cublasLtMatrixLayoutDestroy(layout); }
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;
};

struct Preference {
  cublasLtMatmulPreference_t pref = nullptr;
  Preference() { check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate"); }
  ~Preference() { cublasLtMatmulPreferenceDestroy(pref); }
  Preference(const Preference&) = delete;
  Preference& operator=(const Preference&) = delete;
  template <typename T>
  void set(cublasLtMatmulPreferenceAttributes_t attribute, const T& value) {
    check(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)),
          "cublasLtMatmulPreferenceSetAttribute");
  }
};

// The largest power of two up to 256 that divides the address: the heuristics otherwise assume 256-byte buffers.
uint32_t alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && address % a != 0) a /= 2;
  return a;
}

cublasLtEpilogue_t epilogue_of(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::bias_gelu_aux: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case GemmEpilogue::dgelu: return CUBLASLT_EPILOGUE_DGELU;
    case GemmEpilogue::dgelu_bgrad: return CUBLASLT_EPILOGUE_DGELU_BGRAD;
    case GemmEpilogue::bgradb: return CUBLASLT_EPILOGUE_BGRADB;
  }
  throw std::invalid_argument("launch_gemm_epilogue: unknown epilogue");
}

// The heuristic's pick for a problem, kept for the process: training asks for the same few shapes every step.
using AlgoKey = std::tuple<cublasLtHandle_t, int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int, uint32_t, uint32_t, uint32_t, size_t>;

void validate(const GemmEpilogueParams& p) {
  const auto fail = [](const std::string& why) { throw std::invalid_argument("launch_gemm_epilogue: " + why); };
  if (p.dtype != ElementType::bfloat16 && p.dtype != ElementType::float16) fail("dtype must be float16 or bfloat16");
  if (p.handle == nullptr || p.a == nullptr || p.b == nullptr || p.d == nullptr) fail("null handle or matrix pointer");
  if (p.epilogue != GemmEpilogue::dgelu && p.bias == nullptr) fail("null bias pointer");
  if (p.epilogue != GemmEpilogue::bgradb && p.aux == nullptr) fail("the GELU epilogues need the aux matrix");
  if (p.epilogue == GemmEpilogue::bgradb && !p.transpose_b) fail("bgradb reduces a transposed B");
  if (p.m < 1 || p.n < 1 || p.k < 1) fail("sizes must be at least 1");
  const int64_t a_rows = p.transpose_a ? p.k : p.m, b_rows = p.transpose_b ? p.n : p.k;
  if (p.lda < a_rows || p.ldb < b_rows || p.ldd < p.m || p.lda % 8 != 0 || p.ldb % 8 != 0 || p.ldd % 8 != 0) {
    fail("leading dimensions must cover their matrices and be multiples of 8");
  }
  if (p.workspace_bytes > 0 && p.workspace == nullptr) fail("null workspace of non-zero size");
}

}  // namespace

void launch_gemm_epilogue(const GemmEpilogueParams& p) {
  validate(p);
  const cudaDataType_t type = p.dtype == ElementType::bfloat16 ? CUDA_R_16BF : CUDA_R_16F;
  MatmulDesc op;
  const cublasOperation_t ta = p.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t tb = p.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  op.set(CUBLASLT_MATMUL_DESC_TRANSA, ta);
  op.set(CUBLASLT_MATMUL_DESC_TRANSB, tb);
  op.set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue_of(p.epilogue));
  if (p.epilogue != GemmEpilogue::dgelu) {
    op.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(p.bias));
    op.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, type);
  }
  if (p.aux != nullptr && p.epilogue != GemmEpilogue::bgradb) {
    op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, static_cast<const void*>(p.aux));
    op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, p.ldd);
    op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, type);
  }
  const Layout a(type, p.transpose_a ? p.k : p.m, p.transpose_a ? p.m : p.k, p.lda);
  const Layout b(type, p.transpose_b ? p.n : p.k, p.transpose_b ? p.k : p.n, p.ldb);
  const Layout d(type, p.m, p.n, p.ldd);

  const uint32_t align_a = alignment(p.a), align_b = alignment(p.b), align_d = alignment(p.d);
  const AlgoKey key{p.handle, static_cast<int>(p.epilogue), p.transpose_a, p.transpose_b, p.m, p.n, p.k, p.lda, p.ldb,
                    p.ldd, static_cast<int>(p.dtype), align_a, align_b, align_d, p.workspace_bytes};
  static std::mutex mutex;
  static std::map<AlgoKey, cublasLtMatmulAlgo_t> algos;
  cublasLtMatmulAlgo_t algo;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = algos.find(key);
    if (it != algos.end()) {
      algo = it->second;
    } else {
      Preference pref;
      pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, p.workspace_bytes);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      check(cublasLtMatmulAlgoGetHeuristic(p.handle, op.desc, a.layout, b.layout, d.layout, d.layout, pref.pref, 1,
                                           &result, &found),
            "cublasLtMatmulAlgoGetHeuristic");
      if (found == 0) {
        throw std::runtime_error("launch_gemm_epilogue: cuBLASLt has no algorithm for this epilogue and shape (m " +
                                 std::to_string(p.m) + ", n " + std::to_string(p.n) + ", k " + std::to_string(p.k) +
                                 ")");
      }
      algo = result.algo;
      algos.emplace(key, algo);
    }
  }
  const float one = 1.0f, zero = 0.0f;
  check(cublasLtMatmul(p.handle, op.desc, &one, p.a, a.layout, p.b, b.layout, &zero, p.d, d.layout, p.d, d.layout,
                       &algo, p.workspace, p.workspace_bytes, p.stream),
        "cublasLtMatmul");
}

}  // namespace longnet::fusion::kernels
