#include "attention/autograd_gcc_warnings.h"  // first: its pragmas cover every later include
#include "attention/linear.h"

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/custom_function.h>

#include "attention/cuda_backend.h"
#include "attention/kernels/column_sum.h"
#endif

namespace longnet::attention {
namespace {

#ifdef LONGNET_WITH_CUDA

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

bool kernel_takes(const at::Tensor& x) {
  return x.is_cuda() && is_16bit(x.scalar_type()) && x.dim() == 2 && x.size(0) > 0 && x.size(1) >= 8 &&
         x.size(1) % 8 == 0 && x.size(1) <= kernels::kColumnSumMaxCols && x.is_contiguous() &&
         reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
}

at::Tensor column_sum_kernel(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto partials = at::empty({kernels::column_sum_partial_rows(rows, cols), cols}, x.options().dtype(at::kFloat));
  auto out = at::empty({cols}, x.options());
  kernels::ColumnSumParams p;
  p.x = x.data_ptr();
  p.partials = partials.data_ptr<float>();
  p.out = out.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.dtype = element_type(x.scalar_type());
  p.stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
  kernels::launch_column_sum(p);
  return out;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias) {
    const int64_t in = weight.size(1), rows = x.numel() / in;
    const auto x2 = x.reshape({rows, in}).contiguous();
    ctx->save_for_backward({x2, weight});
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    ctx->saved_data["shape"] = x.sizes().vec();
    return at::addmm(bias, x2, weight.t()).view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &weight = saved[1];
    const int64_t rows = x2.size(0), out = weight.size(0);
    const auto dy = grads[0].defined() ? grads[0].to(x2.scalar_type()).reshape({rows, out}).contiguous()
                                       : at::zeros({rows, out}, x2.options());
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) dx = at::mm(dy, weight).view(ctx->saved_data["shape"].toIntVector());
    if (ctx->needs_input_grad(1)) dw = at::mm(dy.t(), x2);
    if (ctx->needs_input_grad(2)) db = column_sum(dy);
    return {dx, dw, db};
  }
};

#endif  // LONGNET_WITH_CUDA

}  // namespace

at::Tensor column_sum(const at::Tensor& x) {
#ifdef LONGNET_WITH_CUDA
  if (kernel_takes(x)) return column_sum_kernel(x);
#endif
  return x.sum(0);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
#ifdef LONGNET_WITH_CUDA
  if (x.is_cuda() && bias.defined() && weight.dim() == 2 && bias.dim() == 1 && x.dim() >= 1 &&
      x.size(-1) == weight.size(1) && bias.size(0) == weight.size(0) && x.numel() > 0 && weight.size(0) % 8 == 0 &&
      weight.size(1) % 8 == 0) {
    const bool autocast = at::autocast::is_autocast_enabled(at::kCUDA);
    const auto cast = [autocast](const at::Tensor& t) {
      return autocast ? at::autocast::cached_cast(at::autocast::get_autocast_dtype(at::kCUDA), t, at::kCUDA) : t;
    };
    const at::Tensor xc = cast(x), wc = cast(weight), bc = cast(bias);
    const auto dtype = xc.scalar_type();
    if (is_16bit(dtype) && wc.scalar_type() == dtype && bc.scalar_type() == dtype && wc.device() == xc.device() &&
        bc.device() == xc.device()) {
      return LinearFunction::apply(xc, wc, bc);
    }
  }
#endif
  return at::linear(x, weight, bias);
}

}  // namespace longnet::attention
