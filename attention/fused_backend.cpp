// The `fused` backend: torch glue around attention/kernels/fused_dilated.cu (see fused_backend.h).
#include "attention/autograd_gcc_warnings.h"  // first: its pragmas cover every later include
#include "attention/fused_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "attention/cuda_backend.h"
#include "attention/flash_backend.h"
#include "core/error.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/kernels/fused_dilated.h"
#endif

namespace longnet::attention {
namespace {

#ifdef LONGNET_WITH_CUDA

// The backward's float32 accumulators (dq of a chunk of heads, dk and dv of their kv heads) stay below this many
// bytes, a chunk of whole grouped-query groups at a time (as in the flash backend).
constexpr int64_t kAccumulatorBytes = int64_t{4} << 30;

void set_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) dst[d] = t.stride(d);
}

kernels::FusedDilatedParams base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& mask, const DilatedAttentionConfig& config,
                                        double scale) {
  kernels::FusedDilatedParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  set_strides(p.q_strides, q);
  set_strides(p.k_strides, k);
  set_strides(p.v_strides, v);
  p.key_padding = mask ? mask->data_ptr<bool>() : nullptr;
  p.batch = q.size(0);
  p.n = q.size(1);
  p.heads = q.size(2);
  p.kv_heads = k.size(2);
  p.head_dim = q.size(3);
  p.causal = config.causal;
  p.scale = static_cast<float>(scale);
  p.dtype = element_type(q.scalar_type());
  p.stream = at::cuda::getCurrentCUDAStream(q.get_device()).stream();
  return p;
}

// Sets the branch (w clamped to N, r) and its heads restricted to [lo, hi); false when it has none there.
bool set_branch(kernels::FusedDilatedParams& p, const DilatedAttentionConfig& config, size_t i, int64_t lo,
                int64_t hi) {
  const auto [first, last] = config.branch_heads(i, p.heads);
  p.w = std::min(config.segment_lengths[i], p.n);
  p.r = config.dilation_rates[i];
  p.head_lo = std::max(first, lo);
  p.head_hi = std::min(last, hi);
  return p.head_lo < p.head_hi;
}

// LONGNET_FUSED_FORWARD=portable runs the mma.sync kernels where the Hopper (wgmma) ones would, the forward and our
// backward (tests and benchmarks compare the two); "auto" or unset chooses by the device. Any other value is an error.
bool portable_kernels_forced() {
  const char* forced = std::getenv("LONGNET_FUSED_FORWARD");
  if (forced == nullptr || *forced == '\0') return false;
  const std::string name(forced);
  if (name == "portable") return true;
  if (name == "auto") return false;
  throw ConfigError("LONGNET_FUSED_FORWARD must be portable or auto, got '" + name + "'");
}

// Which backward runs: our kernel (wgmma on Hopper with D = 64, mma.sync elsewhere), or the flash backend's (cuDNN's
// fused backward per branch with the merged output and LSE, exact for the whole mix as ours is, then a gather of
// the per-call gradients). "kernel", "auto" or unset in LONGNET_FUSED_BACKWARD take ours, "flash" the flash
// backend's (tests and benchmarks compare the two); any other value is an error.
bool flash_backward_chosen() {
  const char* forced = std::getenv("LONGNET_FUSED_BACKWARD");
  const std::string name = forced != nullptr ? forced : "";
  if (name == "flash") return true;
  if (!name.empty() && name != "auto" && name != "kernel") {
    throw ConfigError("LONGNET_FUSED_BACKWARD must be kernel, flash or auto, got '" + name + "'");
  }
  return false;
}

std::pair<at::Tensor, at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& mask,
                                               const DilatedAttentionConfig& config, double scale) {
  auto out = at::zeros_like(q);
  auto lse = at::full({q.size(0), q.size(2), q.size(1)}, -std::numeric_limits<double>::infinity(),
                      q.options().dtype(at::kFloat));
  auto p = base_params(q, k, v, mask, config, scale);
  p.out = out.data_ptr();
  set_strides(p.out_strides, out);
  p.lse = lse.data_ptr<float>();
  p.portable = portable_kernels_forced();
  for (size_t i = 0; i < config.segment_lengths.size(); ++i) {
    if (!set_branch(p, config, i, 0, p.heads)) continue;
    p.first = config.mix == Mix::head_split || i == 0;  // nothing merged into these heads yet
    kernels::launch_fused_dilated_fwd(p);
  }
  return {out, lse};
}

// Where the backward leaves dq, dk and dv: (B, N, heads, D) views in q's dtype with unit stride over D, written from
// the float32 accumulators in one pass each; dq and dk rotated back (the rotation's transpose) when cos is defined.
struct GradientTargets {
  at::Tensor dq, dk, dv;
  QkvRotation rotation{};  // float32, contiguous
};

void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, const at::Tensor& dout, const std::optional<at::Tensor>& mask,
                   const DilatedAttentionConfig& config, double scale, const GradientTargets& to) {
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), Hkv = k.size(2), D = q.size(3), group = H / Hkv;
  const auto f32 = q.options().dtype(at::kFloat);
  auto p = base_params(q, k, v, mask, config, scale);
  p.out = out.data_ptr();
  set_strides(p.out_strides, out);
  p.lse = lse.data_ptr<float>();
  p.portable = portable_kernels_forced();
  p.dout = dout.data_ptr();
  set_strides(p.dout_strides, dout);
  auto delta = at::empty({B, H, N}, f32), lse_log2 = at::empty({B, H, N}, f32);
  kernels::launch_fused_dilated_bwd_prepare(p, delta.data_ptr<float>(), lse_log2.data_ptr<float>());
  p.delta = delta.data_ptr<float>();
  p.lse_log2 = lse_log2.data_ptr<float>();

  const int64_t group_bytes = (group + 2) * B * N * D * static_cast<int64_t>(sizeof(float));
  const int64_t chunk = std::clamp<int64_t>(kAccumulatorBytes / std::max<int64_t>(group_bytes, 1), 1, Hkv) * group;
  for (int64_t h0 = 0; h0 < H; h0 += chunk) {
    const int64_t hc = std::min(chunk, H - h0);
    // A branch that writes every dk and dv row of the chunk once runs first and writes them (kv_store), so their
    // accumulators need no zeroing: r = 1 reaches every token, and it must serve all the chunk's heads, each the only
    // query head of its kv head.
    const auto branches = config.segment_lengths.size();
    size_t first = branches;
    for (size_t i = 0; i < branches && group == 1; ++i) {
      const auto [lo, hi] = config.branch_heads(i, H);
      if (config.dilation_rates[i] == 1 && lo <= h0 && hi >= h0 + hc) {
        first = i;
        break;
      }
    }
    auto dq_acc = at::zeros({B, N, hc, D}, f32);
    auto dk_acc = first < branches ? at::empty({B, N, hc / group, D}, f32) : at::zeros({B, N, hc / group, D}, f32);
    auto dv_acc = first < branches ? at::empty_like(dk_acc) : at::zeros_like(dk_acc);
    p.dq_acc = dq_acc.data_ptr<float>();
    p.dk_acc = dk_acc.data_ptr<float>();
    p.dv_acc = dv_acc.data_ptr<float>();
    p.acc_heads = hc;
    p.acc_kv_heads = hc / group;
    p.acc_head0 = h0;
    p.acc_kv_head0 = h0 / group;
    if (first < branches && set_branch(p, config, first, h0, h0 + hc)) {
      p.kv_store = true;
      kernels::launch_fused_dilated_bwd(p);
      p.kv_store = false;
    }
    for (size_t i = 0; i < branches; ++i) {
      if (i != first && set_branch(p, config, i, h0, h0 + hc)) kernels::launch_fused_dilated_bwd(p);
    }
    const QkvRotation& t = to.rotation;
    rotate_cuda(dq_acc, t.cos, t.sin, t.q_scale, /*transpose=*/true, to.dq.narrow(2, h0, hc));
    rotate_cuda(dk_acc, t.cos, t.sin, t.k_scale, /*transpose=*/true, to.dk.narrow(2, h0 / group, hc / group));
    rotate_cuda(dv_acc, {}, {}, {}, /*transpose=*/true, to.dv.narrow(2, h0 / group, hc / group));
  }
}

// The fused backend for DilatedFunction (cuda_backend.h).
struct FusedImpl {
  static std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& mask,
                                                   const DilatedAttentionConfig& config, double scale) {
    return forward_impl(q, k, v, mask, config, scale);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
      const at::Tensor& dout, const std::optional<at::Tensor>& mask, const DilatedAttentionConfig& config,
      double scale) {
    if (flash_backward_chosen()) {
      AttentionOptions options;
      options.key_padding_mask = mask;
      options.scale = scale;
      return flash_dilated_attention_backward(q, k, v, out, lse, dout, config, options);
    }
    const GradientTargets to{.dq = at::empty_like(q), .dk = at::empty_like(k), .dv = at::empty_like(v)};
    backward_impl(q, k, v, out, lse, dout, mask, config, scale, to);
    return {to.dq, to.dk, to.dv};
  }
};

// split_qkv and the fused backend's DilatedFunction as one autograd function. The kernels read v (and q, k when
// nothing rotates them) where it lies in the packed projection, so only rotated q and k are written; the backward
// writes the packed gradient straight from its float32 accumulators, rotating dq and dk back in the same pass.
// Apart from the float32 sums' order, the same arithmetic as the two functions one after the other.
class PackedFunction : public torch::autograd::Function<PackedFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& qkv,
                                                int64_t heads, int64_t kv_heads, const std::optional<at::Tensor>& cos,
                                                const std::optional<at::Tensor>& sin,
                                                const std::optional<at::Tensor>& q_scale,
                                                const std::optional<at::Tensor>& k_scale,
                                                const std::optional<at::Tensor>& mask,
                                                const std::vector<int64_t>& segment_lengths,
                                                const std::vector<int64_t>& dilation_rates, bool head_split,
                                                bool causal, double scale) {
    const at::Tensor c = cos.value_or(at::Tensor()), s = sin.value_or(at::Tensor());
    const at::Tensor zq = q_scale.value_or(at::Tensor()), zk = k_scale.value_or(at::Tensor());
    const auto slots = qkv_slots(qkv, heads, kv_heads);
    const at::Tensor q = c.defined() ? rotate_cuda(slots[0], c, s, zq, /*transpose=*/false) : slots[0];
    const at::Tensor k = c.defined() ? rotate_cuda(slots[1], c, s, zk, /*transpose=*/false) : slots[1];
    const auto config = dilated_config_of(segment_lengths, dilation_rates, head_split, causal);
    auto [out, lse] = forward_impl(q, k, slots[2], mask, config, scale);
    ctx->save_for_backward({q, k, slots[2], out, lse, c, s, zq, zk});
    save_call(ctx, mask, config, scale, lse);
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list grads(13);  // one per input of forward
    if (!grad_outputs[0].defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const SavedCall call = saved_call(ctx);
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t B = q.size(0), N = q.size(1), H = q.size(2), Hkv = k.size(2), D = q.size(3);
    const auto dout = grad_outputs[0].to(q.scalar_type()).contiguous();
    grads[0] = at::empty({B, N, (H + 2 * Hkv) * D}, q.options());
    const auto slots = qkv_slots(grads[0], H, Hkv);
    const GradientTargets to{.dq = slots[0], .dk = slots[1], .dv = slots[2],
                             .rotation = {.cos = saved[5], .sin = saved[6], .q_scale = saved[7], .k_scale = saved[8]}};
    if (flash_backward_chosen()) {
      AttentionOptions options;
      options.key_padding_mask = call.mask;
      options.scale = call.scale;
      const auto [dq, dk, dv] = flash_dilated_attention_backward(q, k, v.contiguous(), out, lse, dout, call.config,
                                                                 options);
      const QkvRotation& t = to.rotation;
      rotate_cuda(dq, t.cos, t.sin, t.q_scale, /*transpose=*/true, to.dq);
      rotate_cuda(dk, t.cos, t.sin, t.k_scale, /*transpose=*/true, to.dk);
      rotate_cuda(dv, {}, {}, {}, /*transpose=*/true, to.dv);
    } else {
      backward_impl(q, k, v, out, lse, dout, call.mask, call.config, call.scale, to);
    }
    return grads;
  }
};

#endif  // LONGNET_WITH_CUDA

}  // namespace

bool fused_backend_supports(const at::Tensor& q, const AttentionOptions& options, std::string* why) {
  auto fail = [why](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return false;
  };
  if (!cuda_backend_accepts("fused", q, why)) return false;
#ifdef LONGNET_WITH_CUDA
  if (!kernels::fused_dilated_supports_head_dim(q.size(3))) {
    return fail("head dim D = " + std::to_string(q.size(3)) +
                "; the fused kernels are built for D = 64 and 128 (the flash backend takes multiples of 8 to 256)");
  }
  if (options.relative_bias) return fail("the fused backend has no relative position bias (the reference backend has)");
  const auto* props = at::cuda::getDeviceProperties(q.get_device());
  if (props->major < 8) {
    return fail("the fused kernels need compute capability 8.0 or later, " + std::string(props->name) + " has " +
                std::to_string(props->major) + "." + std::to_string(props->minor));
  }
#else
  (void)options;
#endif
  return true;
}

bool fused_backend_preferred(const at::Tensor& q, const AttentionOptions& options) {
  if (!fused_backend_supports(q, options, nullptr)) return false;
#ifdef LONGNET_WITH_CUDA
  return kernels::fused_dilated_fwd_on_hopper(q.size(3), q.get_device());
#else
  return false;
#endif
}

AttentionResult fused_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const DilatedAttentionConfig& config, const AttentionOptions& options) {
  config.validate();
  std::string why;
  if (!fused_backend_supports(q, options, &why)) throw Error("fused attention backend: " + why);
#ifndef LONGNET_WITH_CUDA
  (void)k;
  (void)v;
  throw Error("fused attention backend: " + why);
#else
  return run_dilated_function<FusedImpl>(q, k, v, check_cuda_backend_inputs("fused", q, k, v, options), config);
#endif
}

AttentionResult fused_dilated_attention_packed(const at::Tensor& qkv, int64_t heads, int64_t kv_heads,
                                               const QkvRotation& rotation, const DilatedAttentionConfig& config,
                                               const AttentionOptions& options) {
  config.validate();
  if (!qkv.defined() || qkv.dim() != 3 || heads < 1 || kv_heads < 1 || qkv.size(2) % (heads + 2 * kv_heads) != 0) {
    throw Error("fused attention backend: qkv must be (B, N, (H + 2·Hkv)·D) for H = " + std::to_string(heads) +
                ", Hkv = " + std::to_string(kv_heads) + ", got " + (qkv.defined() ? sizes_of(qkv) : "undefined"));
  }
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / (heads + 2 * kv_heads);
  const at::Tensor q = qkv.narrow(2, 0, heads * D).view({B, N, heads, D});
  const at::Tensor k = qkv.narrow(2, heads * D, kv_heads * D).view({B, N, kv_heads, D});
  std::string why;
  if (!fused_backend_supports(q, options, &why)) throw Error("fused attention backend: " + why);
#ifndef LONGNET_WITH_CUDA
  (void)rotation;
  (void)k;
  throw Error("fused attention backend: " + why);
#else
  const CudaInputs inputs = check_cuda_backend_inputs("fused", q, k, k, options);
  if (rotation.cos.defined() != rotation.sin.defined() ||
      (!rotation.cos.defined() && (rotation.q_scale.defined() || rotation.k_scale.defined()))) {
    throw Error("fused attention backend: the rotation's cos and sin go together, and its scales need them");
  }
  // The kernel's tables: float32, contiguous, on qkv's device.
  const auto table = [&](const at::Tensor& t) -> std::optional<at::Tensor> {
    if (!t.defined()) return std::nullopt;
    if (t.sizes() != at::IntArrayRef{N, D / 2}) {
      throw Error("fused attention backend: the rotation's tables must be (N, D/2) = (" + std::to_string(N) + ", " +
                  std::to_string(D / 2) + "), got " + sizes_of(t));
    }
    return t.to(qkv.device(), at::kFloat).contiguous();
  };
  const c10::cuda::CUDAGuard guard(qkv.device());
  if (B == 0 || N == 0) {
    return {at::zeros({B, N, heads, D}, qkv.options()),
            at::full({B, heads, N}, -std::numeric_limits<double>::infinity(), qkv.options().dtype(at::kFloat))};
  }
  const auto result = PackedFunction::apply(qkv, heads, kv_heads, table(rotation.cos), table(rotation.sin),
                                            table(rotation.q_scale), table(rotation.k_scale), inputs.mask,
                                            config.segment_lengths, config.dilation_rates,
                                            config.mix == Mix::head_split, config.causal, inputs.scale);
  return {result[0], result[1]};
#endif
}

}  // namespace longnet::attention
