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

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& out,
                                                             const at::Tensor& lse, const at::Tensor& dout,
                                                             const std::optional<at::Tensor>& mask,
                                                             const DilatedAttentionConfig& config, double scale) {
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
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
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
    dq.narrow(2, h0, hc).copy_(dq_acc);
    dk.narrow(2, h0 / group, hc / group).copy_(dk_acc);
    dv.narrow(2, h0 / group, hc / group).copy_(dv_acc);
  }
  return {dq, dk, dv};
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
    return backward_impl(q, k, v, out, lse, dout, mask, config, scale);
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

}  // namespace longnet::attention
