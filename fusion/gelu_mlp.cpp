#include "attention/autograd_gcc_warnings.h"  // first: its pragmas cover every later include
#include "fusion/gelu_mlp.h"

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

#include "core/error.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/custom_function.h>

#include "attention/cuda_backend.h"
#include "attention/linear.h"
#include "fusion/kernels/gemm_epilogue.h"
#endif

namespace longnet::fusion {
namespace {

#ifdef LONGNET_WITH_CUDA

// A GEMM on the current stream with torch's cuBLASLt handle and workspace (shared with torch's own GEMMs, which run
// in stream order with it).
kernels::GemmEpilogueParams gemm_on_stream(const at::Tensor& like, kernels::GemmEpilogue epilogue) {
  kernels::GemmEpilogueParams p;
  p.handle = at::cuda::getCurrentCUDABlasLtHandle();
  p.workspace = at::cuda::getCUDABlasLtWorkspace();
  p.workspace_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
  p.stream = at::cuda::getCurrentCUDAStream(like.get_device()).stream();
  p.dtype = attention::element_type(like.scalar_type());
  p.epilogue = epilogue;
  return p;
}

// Row-major (rows, cols) matrices are cuBLAS's column-major (cols × rows) ones, so each product below is written for
// the transposes: Yᵀ = W·Xᵀ and so on.
class GeluMlpFunction : public torch::autograd::Function<GeluMlpFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t c = x.size(-1), hidden = w1.size(0), rows = x.numel() / c;
    const auto x2 = x.reshape({rows, c}).contiguous();
    const auto w1c = w1.contiguous(), b1c = b1.contiguous(), w2c = w2.contiguous();
    auto pre = at::empty({rows, hidden}, x2.options());
    auto h = at::empty({rows, hidden}, x2.options());
    auto p = gemm_on_stream(x2, kernels::GemmEpilogue::bias_gelu_aux);  // hᵀ = gelu(W1·xᵀ + b1)
    p.transpose_a = true;
    p.m = hidden, p.n = rows, p.k = c;
    p.a = w1c.data_ptr(), p.lda = c;
    p.b = x2.data_ptr(), p.ldb = c;
    p.d = h.data_ptr(), p.ldd = hidden;
    p.aux = pre.data_ptr();
    p.bias = b1c.data_ptr();
    kernels::launch_gemm_epilogue(p);
    const auto y = at::addmm(b2, h, w2c.t());  // torch's cuBLASLt GEMM with the bias in its epilogue
    ctx->save_for_backward({x2, w1c, w2c, pre, h});
    ctx->saved_data["shape"] = x.sizes().vec();
    return y.view(x.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &w1 = saved[1], &w2 = saved[2], &pre = saved[3], &h = saved[4];
    const int64_t rows = x2.size(0), c = x2.size(1), hidden = w1.size(0);
    const c10::cuda::CUDAGuard guard(x2.device());
    const auto dy = grads[0].defined() ? grads[0].to(x2.scalar_type()).reshape({rows, c}).contiguous()
                                       : at::zeros({rows, c}, x2.options());

    // dW2 as torch's GEMM, db2 as a column sum: cuBLASLt's BGRADB epilogue is slower at these sizes
    // (bench/bench_mlp.cpp).
    const auto dw2 = at::mm(dy.t(), h);
    const auto db2 = attention::column_sum(dy);

    // The GELU derivative rides in the GEMM's epilogue; its bias gradient does not: cuBLASLt runs DGELU_BGRAD on an
    // H100 as the GEMM plus a separate pass over a float32 copy, slower than the sum below (bench/bench_mlp.cpp).
    auto dpre = at::empty({rows, hidden}, x2.options());
    auto p = gemm_on_stream(x2, kernels::GemmEpilogue::dgelu);  // dpreᵀ = (W2ᵀ·dyᵀ) ⊙ gelu'(pre)
    p.m = hidden, p.n = rows, p.k = c;
    p.a = w2.data_ptr(), p.lda = hidden;
    p.b = dy.data_ptr(), p.ldb = c;
    p.d = dpre.data_ptr(), p.ldd = hidden;
    p.aux = pre.data_ptr();
    kernels::launch_gemm_epilogue(p);
    const auto db1 = attention::column_sum(dpre);

    const auto dw1 = at::mm(dpre.t(), x2);
    const auto dx = at::mm(dpre, w1);
    const auto shape = ctx->saved_data["shape"].toIntVector();
    return {dx.view(shape), dw1, db1, dw2, db2};
  }
};

#endif  // LONGNET_WITH_CUDA

}  // namespace

bool gelu_mlp_takes(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2) {
#ifdef LONGNET_WITH_CUDA
  if (!x.defined() || !w1.defined() || !b1.defined() || !w2.defined() || !b2.defined()) return false;
  const auto dtype = x.scalar_type();
  if (!x.is_cuda() || (dtype != at::kBFloat16 && dtype != at::kHalf) || x.dim() < 1 || x.numel() == 0) return false;
  for (const at::Tensor* t : {&w1, &b1, &w2, &b2}) {
    if (t->scalar_type() != dtype || t->device() != x.device()) return false;
  }
  const int64_t c = x.size(-1);
  if (w1.dim() != 2 || w1.size(1) != c || w2.dim() != 2 || w2.size(0) != c) return false;
  const int64_t hidden = w1.size(0);
  return w2.size(1) == hidden && b1.dim() == 1 && b1.size(0) == hidden && b2.dim() == 1 && b2.size(0) == c &&
         c % 8 == 0 && hidden % 8 == 0;
#else
  (void)x, (void)w1, (void)b1, (void)w2, (void)b2;
  return false;
#endif
}

at::Tensor gelu_mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2) {
  if (!gelu_mlp_takes(x, w1, b1, w2, b2)) {
    throw Error("gelu_mlp: needs CUDA operands of one 16-bit dtype: x (..., C) with rows, W1 (H, C), b1 (H), "
                "W2 (C, H), b2 (C), C and H multiples of 8, in a build with CUDA");
  }
#ifdef LONGNET_WITH_CUDA
  return GeluMlpFunction::apply(x, w1, b1, w2, b2);
#else
  return {};
#endif
}

}  // namespace longnet::fusion
