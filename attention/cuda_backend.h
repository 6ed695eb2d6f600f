// What the two CUDA backends of dilated attention (flash_backend.h, fused_backend.h) share: the checks of their
// inputs, and the autograd function that saves a call and runs the backend's exact backward. Internal to attention/.
#pragma once

#include <array>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "attention/dilated_attention.h"
#include "attention/kernels/params.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/custom_function.h>
#endif

namespace longnet::attention {

// "(2, 1024, 12, 64)": a tensor's sizes for error messages.
std::string sizes_of(const at::Tensor& t);

// The kernels' element type for a torch dtype (float32, float16, bfloat16); throws longnet::Error for others.
kernels::ElementType element_type(at::ScalarType t);

// The checks of q every CUDA backend makes first: a build with CUDA kernels and a defined (B, N, H, D) bf16/fp16
// CUDA tensor. When false and `why` is given, *why says what is missing, naming "the <backend> backend".
bool cuda_backend_accepts(const std::string& backend, const at::Tensor& q, std::string* why);

// k, v and the options checked against q (shapes, devices, dtypes, the mask), with the scale resolved; throws
// longnet::Error prefixed with "<backend> attention backend: ".
struct CudaInputs {
  std::optional<at::Tensor> mask;  // contiguous
  double scale = 1.0;
};
CudaInputs check_cuda_backend_inputs(const std::string& backend, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const AttentionOptions& options);

#ifdef LONGNET_WITH_CUDA

// x (B, N, H, D) rotated by the rotary kernel (kernels/rotary.h) into `out` and returned: a new contiguous tensor of
// x's dtype when `out` is undefined, else any (B, N, H, D) view with unit stride over D, of x's dtype or, for a
// float32 x (an accumulator), a 16-bit one. `transpose` applies the gradient's map; undefined tables: a copy.
at::Tensor rotate_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& scale,
                       bool transpose, at::Tensor out = {});

// The q, k and v slots of a packed projection (B, N, (H + 2·Hkv)·D) as (B, N, heads, D) views.
std::array<at::Tensor, 3> qkv_slots(const at::Tensor& packed, int64_t heads, int64_t kv_heads);

// The branch configuration as an autograd function receives it (apply() takes no structs).
inline DilatedAttentionConfig dilated_config_of(const std::vector<int64_t>& segment_lengths,
                                                const std::vector<int64_t>& dilation_rates, bool head_split,
                                                bool causal) {
  DilatedAttentionConfig config;
  config.segment_lengths = segment_lengths;
  config.dilation_rates = dilation_rates;
  config.mix = head_split ? Mix::head_split : Mix::lse;
  config.causal = causal;
  return config;
}

// What the backends' autograd functions keep of a call besides their saved tensors, and read back in the backward.
// save_call also marks the LSE output non-differentiable (a statistic) and leaves undefined gradients undefined.
struct SavedCall {
  std::optional<at::Tensor> mask;
  DilatedAttentionConfig config;
  double scale = 1.0;
};
inline void save_call(torch::autograd::AutogradContext* ctx, const std::optional<at::Tensor>& mask,
                      const DilatedAttentionConfig& config, double scale, const at::Tensor& lse) {
  ctx->mark_non_differentiable({lse});
  ctx->set_materialize_grads(false);
  ctx->saved_data["mask"] = mask ? c10::IValue(*mask) : c10::IValue();
  ctx->saved_data["segment_lengths"] = config.segment_lengths;
  ctx->saved_data["dilation_rates"] = config.dilation_rates;
  ctx->saved_data["head_split"] = config.mix == Mix::head_split;
  ctx->saved_data["causal"] = config.causal;
  ctx->saved_data["scale"] = scale;
}
inline SavedCall saved_call(torch::autograd::AutogradContext* ctx) {
  SavedCall call;
  if (!ctx->saved_data["mask"].isNone()) call.mask = ctx->saved_data["mask"].toTensor();
  call.config = dilated_config_of(ctx->saved_data["segment_lengths"].toIntVector(),
                                  ctx->saved_data["dilation_rates"].toIntVector(),
                                  ctx->saved_data["head_split"].toBool(), ctx->saved_data["causal"].toBool());
  call.scale = ctx->saved_data["scale"].toDouble();
  return call;
}

// Autograd through a CUDA backend `Impl`, which provides
//   static std::pair<at::Tensor, at::Tensor> forward(q, k, v, mask, config, scale);             // out, lse
//   static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(q, k, v, out, lse, dout, mask, config, scale);
// The backward differentiates `out`; the LSE is returned as a statistic (no gradient flows through it).
template <class Impl>
class DilatedFunction : public torch::autograd::Function<DilatedFunction<Impl>> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& mask,
                                                const std::vector<int64_t>& segment_lengths,
                                                const std::vector<int64_t>& dilation_rates, bool head_split,
                                                bool causal, double scale) {
    const auto config = dilated_config_of(segment_lengths, dilation_rates, head_split, causal);
    auto [out, lse] = Impl::forward(q, k, v, mask, config, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    save_call(ctx, mask, config, scale, lse);
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    torch::autograd::variable_list grads(9);
    if (!grad_outputs[0].defined()) return grads;
    const SavedCall call = saved_call(ctx);
    const c10::cuda::CUDAGuard guard(saved[0].device());
    auto [dq, dk, dv] = Impl::backward(saved[0], saved[1], saved[2], saved[3], saved[4],
                                       grad_outputs[0].to(saved[0].scalar_type()).contiguous(), call.mask,
                                       call.config, call.scale);
    grads[0] = dq;
    grads[1] = dk;
    grads[2] = dv;
    return grads;
  }
};

// Attention through DilatedFunction<Impl> for checked inputs. The kernels assume the (B, N, H, D) row-major layout,
// so a non-contiguous input (a slice of a fused qkv projection, say) is copied once here; an empty input gives zeros
// and an all -inf LSE.
template <class Impl>
AttentionResult run_dilated_function(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const CudaInputs& inputs, const DilatedAttentionConfig& config) {
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2);
  const c10::cuda::CUDAGuard guard(q.device());
  if (B == 0 || N == 0 || H == 0) {
    return {at::zeros_like(q), at::full({B, H, N}, -std::numeric_limits<double>::infinity(),
                                        q.options().dtype(at::kFloat))};
  }
  auto result = DilatedFunction<Impl>::apply(q.contiguous(), k.contiguous(), v.contiguous(), inputs.mask,
                                             config.segment_lengths, config.dilation_rates,
                                             config.mix == Mix::head_split, config.causal, inputs.scale);
  return {result[0], result[1]};
}

#endif  // LONGNET_WITH_CUDA

}  // namespace longnet::attention
