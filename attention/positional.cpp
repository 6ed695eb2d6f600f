#include "attention/autograd_gcc_warnings.h"  // first: its pragmas cover every later include
#include "attention/positional.h"

#include <cmath>
#include <optional>

#include <ATen/ATen.h>

#include "core/error.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/custom_function.h>

#include "attention/cuda_backend.h"
#endif

namespace longnet::attention {
namespace {

void check_head_dim(int64_t head_dim, const char* what) {
  if (head_dim < 2 || head_dim % 2 != 0) {
    throw Error(std::string(what) + " needs an even head dimension >= 2, got " + std::to_string(head_dim));
  }
}

// i = 0 .. D/2-1 as float64 on the device of `like`.
at::Tensor half_dim_index(int64_t head_dim, const at::Tensor& like) {
  return at::arange(head_dim / 2, like.options().dtype(at::kDouble));
}

#ifdef LONGNET_WITH_CUDA

// The rotary encoding as one kernel each way; the tables are constants (positions carry no gradient).
class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  // `scale` is optional rather than undefined: apply() records every tensor argument as a variable.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin, const std::optional<at::Tensor>& scale) {
    const at::Tensor z = scale.value_or(at::Tensor());
    ctx->save_for_backward({cos, sin, z});
    return rotate_cuda(x, cos, sin, z, /*transpose=*/false);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {rotate_cuda(grads[0], saved[0], saved[1], saved[2], /*transpose=*/true), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// Splits a packed projection (B, N, (H + 2·Hkv)·D) into q, k and v, contiguous, rotating q and k when `cos` is
// defined. The backward writes the three gradients straight into one packed gradient: q, k and v as views of the
// projection would each come back as a full-size tensor (or a concatenation) to be summed.
class SplitQkvFunction : public torch::autograd::Function<SplitQkvFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& qkv,
                                                int64_t heads, int64_t kv_heads, const std::optional<at::Tensor>& cos,
                                                const std::optional<at::Tensor>& sin,
                                                const std::optional<at::Tensor>& q_scale,
                                                const std::optional<at::Tensor>& k_scale) {
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["kv_heads"] = kv_heads;
    const at::Tensor c = cos.value_or(at::Tensor()), s = sin.value_or(at::Tensor());
    const at::Tensor zq = q_scale.value_or(at::Tensor()), zk = k_scale.value_or(at::Tensor());
    ctx->save_for_backward({c, s, zq, zk});
    const auto parts = qkv_slots(qkv, heads, kv_heads);
    // The slots are strided views; the kernel writes each into a contiguous tensor (v and unrotated q, k copied).
    return {rotate_cuda(parts[0], c, s, zq, /*transpose=*/false), rotate_cuda(parts[1], c, s, zk, /*transpose=*/false),
            rotate_cuda(parts[2], {}, {}, {}, /*transpose=*/false)};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t heads = ctx->saved_data["heads"].toInt(), kv_heads = ctx->saved_data["kv_heads"].toInt();
    const at::Tensor& any = grads[0].defined() ? grads[0] : grads[1].defined() ? grads[1] : grads[2];
    const int64_t b = any.size(0), n = any.size(1), d = any.size(3);
    at::Tensor grad = at::empty({b, n, (heads + 2 * kv_heads) * d}, any.options());
    const auto parts = qkv_slots(grad, heads, kv_heads);
    for (size_t i = 0; i < 3; ++i) {
      if (!grads[i].defined()) {
        parts[i].zero_();
      } else if (i < 2) {
        rotate_cuda(grads[i], saved[0], saved[1], saved[2 + i], /*transpose=*/true, parts[i]);
      } else {
        rotate_cuda(grads[i], {}, {}, {}, /*transpose=*/true, parts[i]);
      }
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }

};

#endif  // LONGNET_WITH_CUDA

}  // namespace

std::pair<at::Tensor, at::Tensor> rotary_cos_sin(const at::Tensor& positions, int64_t head_dim, double theta) {
  check_head_dim(head_dim, "rotary position encoding");
  // θ^(-2i/D)
  const at::Tensor inv_freq = at::pow(theta, half_dim_index(head_dim, positions) * (-2.0 / static_cast<double>(head_dim)));
  // angles: (N, D/2)
  const at::Tensor angles = positions.to(at::kDouble).unsqueeze(1) * inv_freq.unsqueeze(0);
  return {angles.cos(), angles.sin()};
}

at::Tensor xpos_scale(const at::Tensor& positions, int64_t head_dim, double scale_base) {
  check_head_dim(head_dim, "xPos");
  // ζ_i ∈ [0.29, 1): low frequencies (large i) decay least, which is what lets xPos extrapolate.
  const at::Tensor zeta = (half_dim_index(head_dim, positions) * (2.0 / static_cast<double>(head_dim)) + 0.4) / 1.4;
  const at::Tensor power = positions.to(at::kDouble).unsqueeze(1) / scale_base;  // (N, 1)
  return at::pow(zeta.unsqueeze(0), power);                                       // (N, D/2)
}

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& scale) {
  if (x.dim() != 4 || x.size(-1) % 2 != 0) {
    throw Error("apply_rotary: x must be (B, N, H, D) with even D, got " + std::to_string(x.dim()) + " dims");
  }
  const int64_t n = x.size(1), half = x.size(3) / 2;
  if (cos.sizes() != at::IntArrayRef{n, half} || sin.sizes() != cos.sizes() ||
      (scale.defined() && scale.sizes() != cos.sizes())) {
    throw Error("apply_rotary: cos, sin and scale must be (N, D/2) = (" + std::to_string(n) + ", " +
                std::to_string(half) + ")");
  }
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
#ifdef LONGNET_WITH_CUDA
  // CUDA float32/half inputs: one kernel each way, with the same float32 arithmetic as the ops below.
  const auto dtype = x.scalar_type();
  if (x.is_cuda() && (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && x.numel() > 0) {
    auto table = [&](const at::Tensor& t) { return t.to(x.device(), at::kFloat).contiguous(); };
    return RotaryFunction::apply(x, table(cos), table(sin),
                                 scale.defined() ? std::optional<at::Tensor>(table(scale)) : std::nullopt);
  }
#endif
  const at::Tensor xc = x.to(compute);
  // (N, D/2) → (1, N, 1, D/2) to broadcast over batch and heads
  auto as_table = [&](const at::Tensor& t) { return t.to(compute).unsqueeze(0).unsqueeze(2); };
  const at::Tensor c = as_table(cos), s = as_table(sin);
  const at::Tensor x1 = xc.narrow(-1, 0, half), x2 = xc.narrow(-1, half, half);
  at::Tensor r1 = x1 * c - x2 * s;
  at::Tensor r2 = x2 * c + x1 * s;
  if (scale.defined()) {
    const at::Tensor z = as_table(scale);
    r1 = r1 * z;
    r2 = r2 * z;
  }
  return at::cat({r1, r2}, -1).to(x.scalar_type());
}

Qkv split_qkv(const at::Tensor& qkv, int64_t heads, int64_t kv_heads, const at::Tensor& cos, const at::Tensor& sin,
              const at::Tensor& q_scale, const at::Tensor& k_scale) {
  if (heads < 1 || kv_heads < 1 || qkv.dim() != 3 || qkv.size(2) % (heads + 2 * kv_heads) != 0) {
    throw Error("split_qkv: qkv must be (B, N, (H + 2·Hkv)·D) for H = " + std::to_string(heads) +
                ", Hkv = " + std::to_string(kv_heads) + ", got " + std::to_string(qkv.dim()) + " dims" +
                (qkv.dim() == 3 ? " with last size " + std::to_string(qkv.size(2)) : std::string()));
  }
  if (cos.defined() != sin.defined() || (!cos.defined() && (q_scale.defined() || k_scale.defined()))) {
    throw Error("split_qkv: cos and sin go together, and the scales need them");
  }
  const int64_t b = qkv.size(0), n = qkv.size(1), d = qkv.size(2) / (heads + 2 * kv_heads);
#ifdef LONGNET_WITH_CUDA
  const auto dtype = qkv.scalar_type();
  // The kernel moves pairs (i, i + D/2), so an odd head dimension (no rotation then) takes the ops below.
  if (qkv.is_cuda() && (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && qkv.numel() > 0 &&
      qkv.stride(2) == 1 && d % 2 == 0) {
    if (cos.defined()) {
      check_head_dim(d, "rotary position encoding");
      for (const at::Tensor* t : {&cos, &sin, &q_scale, &k_scale}) {
        if (t->defined() && t->sizes() != at::IntArrayRef{n, d / 2}) {
          throw Error("split_qkv: cos, sin and the scales must be (N, D/2) = (" + std::to_string(n) + ", " +
                      std::to_string(d / 2) + ")");
        }
      }
    }
    auto table = [&](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t.to(qkv.device(), at::kFloat).contiguous()) : std::nullopt;
    };
    const auto out = SplitQkvFunction::apply(qkv, heads, kv_heads, table(cos), table(sin), table(q_scale),
                                             table(k_scale));
    return {out[0], out[1], out[2]};
  }
#endif
  const auto parts = qkv.split_with_sizes({heads * d, kv_heads * d, kv_heads * d}, 2);
  Qkv out{parts[0].view({b, n, heads, d}), parts[1].view({b, n, kv_heads, d}), parts[2].view({b, n, kv_heads, d})};
  if (cos.defined()) {
    out.q = apply_rotary(out.q, cos, sin, q_scale);
    out.k = apply_rotary(out.k, cos, sin, k_scale);
  }
  return out;
}

}  // namespace longnet::attention
