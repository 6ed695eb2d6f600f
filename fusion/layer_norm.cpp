#include "attention/autograd_gcc_warnings.h"  // first: its pragmas cover every later include
#include "fusion/layer_norm.h"

#include <cstdint>
#include <string>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include "core/error.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/custom_function.h>

#include "attention/cuda_backend.h"
#include "fusion/kernels/layer_norm.h"
#endif

namespace longnet::fusion {
namespace {

bool kernel_takes(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t width = weight.defined() ? weight.numel() : 0;
  return x.is_cuda() && x.scalar_type() == at::kFloat && weight.defined() && bias.defined() && weight.dim() == 1 &&
         weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat && x.dim() >= 1 &&
         x.size(-1) == width && width % 4 == 0 && width >= 4 && width <= 1024 && weight.device() == x.device() &&
         bias.device() == x.device();
}

#ifdef LONGNET_WITH_CUDA

// The kernels move 16-byte vectors: a contiguous tensor that starts off a 16-byte boundary (a view at an odd
// offset) is copied.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

class LayerNormToFunction : public torch::autograd::Function<LayerNormToFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, double eps, at::ScalarType out_dtype) {
    const c10::cuda::CUDAGuard guard(x.device());
    const auto xc = aligned_contiguous(x);
    const int64_t width = weight.numel(), rows = xc.numel() / width;
    auto y = at::empty(xc.sizes(), xc.options().dtype(out_dtype));
    auto mean = at::empty({rows}, xc.options()), rstd = at::empty({rows}, xc.options());
    kernels::LayerNormForwardParams p;
    p.x = xc.data_ptr<float>();
    const auto w = aligned_contiguous(weight), b = aligned_contiguous(bias);
    p.weight = w.data_ptr<float>();
    p.bias = b.data_ptr<float>();
    p.y = y.data_ptr();
    p.mean = mean.data_ptr<float>();
    p.rstd = rstd.data_ptr<float>();
    p.rows = rows;
    p.width = width;
    p.eps = static_cast<float>(eps);
    p.dtype = attention::element_type(out_dtype);
    p.stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
    kernels::launch_layer_norm_forward(p);
    ctx->save_for_backward({xc, weight, mean, rstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t width = weight.numel(), rows = x.numel() / width;
    auto dy = grads[0];
    if (dy.scalar_type() != at::kHalf && dy.scalar_type() != at::kBFloat16) dy = dy.to(at::kBFloat16);
    dy = aligned_contiguous(dy);
    auto dx = at::empty_like(x);
    auto partials = at::empty({kernels::layer_norm_partial_rows(rows), 2, width}, x.options());
    kernels::LayerNormBackwardParams p;
    p.dy = dy.data_ptr();
    p.x = x.data_ptr<float>();
    const auto w = aligned_contiguous(weight);
    p.weight = w.data_ptr<float>();
    p.mean = mean.data_ptr<float>();
    p.rstd = rstd.data_ptr<float>();
    p.dx = dx.data_ptr<float>();
    p.partials = partials.data_ptr<float>();
    p.rows = rows;
    p.width = width;
    p.dtype = attention::element_type(dy.scalar_type());
    p.stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
    kernels::launch_layer_norm_backward(p);
    const auto sums = partials.sum(0);  // (2, width): dweight, dbias
    return {dx, sums[0], sums[1], at::Tensor(), at::Tensor()};
  }
};

// x + a and its layer norm; outputs {sum, normed}.
class AddLayerNormToFunction : public torch::autograd::Function<AddLayerNormToFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias,
                                                double eps, at::ScalarType out_dtype) {
    const c10::cuda::CUDAGuard guard(x.device());
    const auto xc = aligned_contiguous(x), ac = aligned_contiguous(a);
    const int64_t width = weight.numel(), rows = xc.numel() / width;
    auto sum = at::empty_like(xc);
    auto y = at::empty(xc.sizes(), xc.options().dtype(out_dtype));
    auto mean = at::empty({rows}, xc.options()), rstd = at::empty({rows}, xc.options());
    const auto w = aligned_contiguous(weight), b = aligned_contiguous(bias);
    kernels::LayerNormForwardParams p;
    p.x = xc.data_ptr<float>();
    p.residual = ac.data_ptr();
    p.sum = sum.data_ptr<float>();
    p.weight = w.data_ptr<float>();
    p.bias = b.data_ptr<float>();
    p.y = y.data_ptr();
    p.mean = mean.data_ptr<float>();
    p.rstd = rstd.data_ptr<float>();
    p.rows = rows;
    p.width = width;
    p.eps = static_cast<float>(eps);
    p.dtype = attention::element_type(out_dtype);
    p.stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
    kernels::launch_layer_norm_forward(p);
    ctx->save_for_backward({sum, weight, mean, rstd});
    ctx->saved_data["dtype"] = static_cast<int64_t>(out_dtype);
    return {sum, y};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &sum = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const c10::cuda::CUDAGuard guard(sum.device());
    const int64_t width = weight.numel(), rows = sum.numel() / width;
    // Undefined when the normalised output took no part in the loss.
    const auto dy = grads[1].defined() ? aligned_contiguous(grads[1].to(dtype)) : at::zeros(sum.sizes(),
                                                                                             sum.options().dtype(dtype));
    at::Tensor grad_sum;
    if (grads[0].defined()) grad_sum = aligned_contiguous(grads[0].to(at::kFloat));
    auto dx = at::empty_like(sum);
    auto da = at::empty(sum.sizes(), sum.options().dtype(dtype));
    auto partials = at::empty({kernels::layer_norm_partial_rows(rows), 2, width}, sum.options());
    const auto w = aligned_contiguous(weight);
    kernels::LayerNormBackwardParams p;
    p.dy = dy.data_ptr();
    p.x = sum.data_ptr<float>();
    p.weight = w.data_ptr<float>();
    p.grad_sum = grad_sum.defined() ? grad_sum.data_ptr<float>() : nullptr;
    p.grad_residual = da.data_ptr();
    p.mean = mean.data_ptr<float>();
    p.rstd = rstd.data_ptr<float>();
    p.dx = dx.data_ptr<float>();
    p.partials = partials.data_ptr<float>();
    p.rows = rows;
    p.width = width;
    p.dtype = attention::element_type(dtype);
    p.stream = at::cuda::getCurrentCUDAStream(sum.get_device()).stream();
    kernels::launch_layer_norm_backward(p);
    const auto sums = partials.sum(0);
    return {dx, da, sums[0], sums[1], at::Tensor(), at::Tensor()};
  }
};

#endif  // LONGNET_WITH_CUDA

}  // namespace

at::Tensor layer_norm_to(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                         at::ScalarType out_dtype) {
  if (!kernel_takes(x, weight, bias) || (out_dtype != at::kHalf && out_dtype != at::kBFloat16)) {
    throw Error("layer_norm_to: needs a float32 CUDA input whose last dim is the width of float32 weight and bias "
                "(a multiple of 4 up to 1024) and a 16-bit output dtype");
  }
#ifdef LONGNET_WITH_CUDA
  return LayerNormToFunction::apply(x, weight, bias, eps, out_dtype);
#else
  throw Error("layer_norm_to: this build has no CUDA kernels (configure with LONGNET_CUDA=ON)");
#endif
}

std::pair<at::Tensor, at::Tensor> add_layer_norm_to(const at::Tensor& x, const at::Tensor& a, const at::Tensor& weight,
                                                    const at::Tensor& bias, double eps, at::ScalarType out_dtype) {
  if (!kernel_takes(x, weight, bias) || (out_dtype != at::kHalf && out_dtype != at::kBFloat16) ||
      a.scalar_type() != out_dtype || a.sizes() != x.sizes() || a.device() != x.device()) {
    throw Error("add_layer_norm_to: needs a float32 CUDA input whose last dim is the width of float32 weight and "
                "bias (a multiple of 4 up to 1024), a residual of its shape in the 16-bit output dtype");
  }
#ifdef LONGNET_WITH_CUDA
  const auto out = AddLayerNormToFunction::apply(x, a, weight, bias, eps, out_dtype);
  return {out[0], out[1]};
#else
  throw Error("add_layer_norm_to: this build has no CUDA kernels (configure with LONGNET_CUDA=ON)");
#endif
}

std::pair<at::Tensor, at::Tensor> LayerNormImpl::forward_residual(const at::Tensor& x, const at::Tensor& a) {
#ifdef LONGNET_WITH_CUDA
  if (at::autocast::is_autocast_enabled(at::kCUDA) && options.normalized_shape().size() == 1 &&
      kernel_takes(x, weight, bias) && a.scalar_type() == at::autocast::get_autocast_dtype(at::kCUDA) &&
      a.sizes() == x.sizes() && a.device() == x.device()) {
    return add_layer_norm_to(x, a, weight, bias, options.eps(), a.scalar_type());
  }
#endif
  at::Tensor sum = x + a;
  return {sum, forward(sum)};
}

at::Tensor LayerNormImpl::forward(const at::Tensor& x) {
#ifdef LONGNET_WITH_CUDA
  if (at::autocast::is_autocast_enabled(at::kCUDA) && options.normalized_shape().size() == 1 &&
      kernel_takes(x, weight, bias)) {
    return layer_norm_to(x, weight, bias, options.eps(), at::autocast::get_autocast_dtype(at::kCUDA));
  }
#endif
  return torch::nn::LayerNormImpl::forward(x);
}

}  // namespace longnet::fusion
