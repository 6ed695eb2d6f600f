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

// x: float32, or `out_dtype` (a 16-bit residual stream).
bool kernel_takes(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::ScalarType out_dtype) {
  const int64_t width = weight.defined() ? weight.numel() : 0;
  return x.is_cuda() && (out_dtype == at::kHalf || out_dtype == at::kBFloat16) &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == out_dtype) && weight.defined() && bias.defined() &&
         weight.dim() == 1 &&
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

// The forward kernel on x (and the residual a, when given): {x or x + a, the normalised output, mean, rstd}.
struct Normalized {
  at::Tensor input, y, mean, rstd;
};

Normalized normalize(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, const at::Tensor& bias,
                     double eps, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = aligned_contiguous(x);
  const int64_t width = weight.numel(), rows = xc.numel() / width;
  Normalized out;
  out.y = at::empty(xc.sizes(), xc.options().dtype(out_dtype));
  out.mean = at::empty({rows}, xc.options().dtype(at::kFloat));
  out.rstd = at::empty({rows}, xc.options().dtype(at::kFloat));
  const auto w = aligned_contiguous(weight), b = aligned_contiguous(bias);
  at::Tensor ac;
  kernels::LayerNormForwardParams p;
  p.x = xc.data_ptr();
  p.x_dtype = attention::element_type(xc.scalar_type());
  if (residual != nullptr) {
    ac = aligned_contiguous(*residual);
    out.input = at::empty_like(xc);
    p.residual = ac.data_ptr();
    p.sum = out.input.data_ptr();
  } else {
    out.input = xc;
  }
  p.weight = w.data_ptr<float>();
  p.bias = b.data_ptr<float>();
  p.y = out.y.data_ptr();
  p.mean = out.mean.data_ptr<float>();
  p.rstd = out.rstd.data_ptr<float>();
  p.rows = rows;
  p.width = width;
  p.eps = static_cast<float>(eps);
  p.dtype = attention::element_type(out_dtype);
  p.stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
  kernels::launch_layer_norm_forward(p);
  return out;
}

// The backward kernel: {dx (in the input's dtype), dweight, dbias}, plus the gradient of the residual in dy's dtype
// when `residual` (with `grad_sum`, the gradient x + a receives from its other uses, added to dx; may be undefined).
// With a 16-bit input the two gradients are one tensor.
struct Gradients {
  at::Tensor dx, dresidual, dweight, dbias;
};

Gradients normalize_backward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
                             const at::Tensor& rstd, const at::Tensor& dy_in, bool residual,
                             const at::Tensor& grad_sum_in) {
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t width = weight.numel(), rows = input.numel() / width;
  const auto dy = aligned_contiguous(dy_in), w = aligned_contiguous(weight);
  const auto grad_sum =
      grad_sum_in.defined() ? aligned_contiguous(grad_sum_in.to(input.scalar_type())) : at::Tensor();
  const bool stream16 = input.scalar_type() != at::kFloat;
  Gradients out;
  out.dx = at::empty_like(input);
  if (residual) out.dresidual = stream16 ? out.dx : at::empty(input.sizes(), input.options().dtype(dy.scalar_type()));
  auto partials = at::empty({kernels::layer_norm_partial_rows(rows), 2, width}, input.options().dtype(at::kFloat));
  kernels::LayerNormBackwardParams p;
  p.dy = dy.data_ptr();
  p.x = input.data_ptr();
  p.x_dtype = attention::element_type(input.scalar_type());
  p.weight = w.data_ptr<float>();
  p.grad_sum = grad_sum.defined() ? grad_sum.data_ptr() : nullptr;
  p.grad_residual = residual ? out.dresidual.data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dx = out.dx.data_ptr();
  p.partials = partials.data_ptr<float>();
  p.rows = rows;
  p.width = width;
  p.dtype = attention::element_type(dy.scalar_type());
  p.stream = at::cuda::getCurrentCUDAStream(input.get_device()).stream();
  kernels::launch_layer_norm_backward(p);
  const auto sums = partials.sum(0);  // (2, width): dweight, dbias
  out.dweight = sums[0];
  out.dbias = sums[1];
  return out;
}

// The gradient reaching a 16-bit output, in that output's dtype (autograd already gives it so); zeros when the output
// took no part in the loss.
at::Tensor output_gradient(const at::Tensor& grad, const at::Tensor& like, at::ScalarType dtype) {
  return grad.defined() ? grad.to(dtype) : at::zeros(like.sizes(), like.options().dtype(dtype));
}

class LayerNormToFunction : public torch::autograd::Function<LayerNormToFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, double eps, at::ScalarType out_dtype) {
    Normalized n = normalize(x, nullptr, weight, bias, eps, out_dtype);
    ctx->save_for_backward({n.input, weight, n.mean, n.rstd});
    ctx->saved_data["dtype"] = static_cast<int64_t>(out_dtype);
    return n.y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const Gradients g = normalize_backward(saved[0], saved[1], saved[2], saved[3],
                                           output_gradient(grads[0], saved[0], dtype), false, at::Tensor());
    return {g.dx, g.dweight, g.dbias, at::Tensor(), at::Tensor()};
  }
};

// x + a and its layer norm; outputs {sum, normed}.
class AddLayerNormToFunction : public torch::autograd::Function<AddLayerNormToFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias,
                                                double eps, at::ScalarType out_dtype) {
    Normalized n = normalize(x, &a, weight, bias, eps, out_dtype);
    ctx->save_for_backward({n.input, weight, n.mean, n.rstd});
    ctx->saved_data["dtype"] = static_cast<int64_t>(out_dtype);
    return {n.input, n.y};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const Gradients g = normalize_backward(saved[0], saved[1], saved[2], saved[3],
                                           output_gradient(grads[1], saved[0], dtype), true, grads[0]);
    return {g.dx, g.dresidual, g.dweight, g.dbias, at::Tensor(), at::Tensor()};
  }
};

#endif  // LONGNET_WITH_CUDA

}  // namespace

at::Tensor layer_norm_to(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                         at::ScalarType out_dtype) {
  if (!kernel_takes(x, weight, bias, out_dtype)) {
    throw Error("layer_norm_to: needs a 16-bit output dtype and a CUDA input in float32 or that dtype whose last dim "
                "is the width of float32 weight and bias (a multiple of 4 up to 1024)");
  }
#ifdef LONGNET_WITH_CUDA
  return LayerNormToFunction::apply(x, weight, bias, eps, out_dtype);
#else
  throw Error("layer_norm_to: this build has no CUDA kernels (configure with LONGNET_CUDA=ON)");
#endif
}

std::pair<at::Tensor, at::Tensor> add_layer_norm_to(const at::Tensor& x, const at::Tensor& a, const at::Tensor& weight,
                                                    const at::Tensor& bias, double eps, at::ScalarType out_dtype) {
  if (!kernel_takes(x, weight, bias, out_dtype) || a.scalar_type() != out_dtype || a.sizes() != x.sizes() ||
      a.device() != x.device()) {
    throw Error("add_layer_norm_to: needs a 16-bit output dtype, a CUDA input in float32 or that dtype whose last "
                "dim is the width of float32 weight and bias (a multiple of 4 up to 1024), and a residual of its "
                "shape in the output dtype");
  }
#ifdef LONGNET_WITH_CUDA
  const auto out = AddLayerNormToFunction::apply(x, a, weight, bias, eps, out_dtype);
  return {out[0], out[1]};
#else
  throw Error("add_layer_norm_to: this build has no CUDA kernels (configure with LONGNET_CUDA=ON)");
#endif
}

bool LayerNormImpl::one_kernel(const at::Tensor& x) const {
#ifdef LONGNET_WITH_CUDA
  return at::autocast::is_autocast_enabled(at::kCUDA) && options.normalized_shape().size() == 1 &&
         kernel_takes(x, weight, bias, at::autocast::get_autocast_dtype(at::kCUDA));
#else
  (void)x;
  return false;
#endif
}

std::pair<at::Tensor, at::Tensor> LayerNormImpl::forward_residual(const at::Tensor& x, const at::Tensor& a) {
  if (one_kernel(x) && a.scalar_type() == at::autocast::get_autocast_dtype(at::kCUDA) && a.sizes() == x.sizes() &&
      a.device() == x.device()) {
    return add_layer_norm_to(x, a, weight, bias, options.eps(), a.scalar_type());
  }
  at::Tensor sum = x + a;
  return {sum, forward(sum)};
}

at::Tensor LayerNormImpl::forward_keeping_dtype(const at::Tensor& x) {
  if (one_kernel(x) && x.scalar_type() == at::autocast::get_autocast_dtype(at::kCUDA)) return forward(x);
  return torch::nn::LayerNormImpl::forward(x);
}

at::Tensor LayerNormImpl::forward(const at::Tensor& x) {
  if (one_kernel(x)) return layer_norm_to(x, weight, bias, options.eps(), at::autocast::get_autocast_dtype(at::kCUDA));
  return torch::nn::LayerNormImpl::forward(x);
}

}  // namespace longnet::fusion
