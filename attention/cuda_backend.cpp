#include "attention/cuda_backend.h"

#include <cmath>
#include <string>
#include <utility>

#include "core/error.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/kernels/rotary.h"
#endif

namespace longnet::attention {

std::string sizes_of(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + ")";
}

kernels::ElementType element_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return kernels::ElementType::bfloat16;
    case at::kHalf: return kernels::ElementType::float16;
    case at::kFloat: return kernels::ElementType::float32;
    default: throw Error(std::string("CUDA attention kernels: unsupported element type ") + c10::toString(t));
  }
}

bool cuda_backend_accepts(const std::string& backend, const at::Tensor& q, std::string* why) {
  auto fail = [why](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return false;
  };
#ifndef LONGNET_WITH_CUDA
  (void)backend;
  (void)q;
  return fail("this build has no CUDA kernels (configure with -DLONGNET_CUDA=ON)");
#else
  if (!q.defined()) return fail("q is undefined");
  if (!q.is_cuda()) return fail("q is on " + q.device().str() + "; the " + backend + " backend needs a CUDA tensor");
  if (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf) {
    return fail(std::string("q is ") + c10::toString(q.scalar_type()) + "; the " + backend +
                " backend needs bfloat16 or float16 (the reference backend takes any dtype)");
  }
  if (q.dim() != 4) return fail("q must be (B, N, H, D), got " + sizes_of(q));
  return true;
#endif
}

CudaInputs check_cuda_backend_inputs(const std::string& backend, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const AttentionOptions& options) {
  auto expect = [&backend](bool ok, const std::string& message) {
    if (!ok) throw Error(backend + " attention backend: " + message);
  };
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}}) {
    expect(t->defined(), std::string(name) + " is undefined");
    expect(t->dim() == 4, std::string(name) + " must be (B, N, Hkv, D), got " + sizes_of(*t));
    expect(t->device() == q.device(), std::string(name) + " is on " + t->device().str() + ", q on " +
                                          q.device().str());
    expect(t->scalar_type() == q.scalar_type(), std::string(name) + " is " + c10::toString(t->scalar_type()) +
                                                    ", q is " + c10::toString(q.scalar_type()));
  }
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  expect(k.size(0) == B && k.size(1) == N && k.size(3) == D && k.size(2) >= 1,
         "k must be (B, N, Hkv, D) = (" + std::to_string(B) + ", " + std::to_string(N) + ", Hkv, " +
             std::to_string(D) + ") for q " + sizes_of(q) + ", got " + sizes_of(k));
  expect(v.sizes() == k.sizes(), "v must have k's shape " + sizes_of(k) + ", got " + sizes_of(v));
  expect(H % k.size(2) == 0, "q's heads H = " + std::to_string(H) + " must be a multiple of k's heads Hkv = " +
                                 std::to_string(k.size(2)));
  CudaInputs checked;
  if (options.key_padding_mask) {
    const at::Tensor& m = *options.key_padding_mask;
    expect(m.defined() && m.dim() == 2 && m.size(0) == B && m.size(1) == N,
           "key_padding_mask must be (B, N) = (" + std::to_string(B) + ", " + std::to_string(N) + "), got " +
               (m.defined() ? sizes_of(m) : std::string("undefined")));
    expect(m.scalar_type() == at::kBool,
           std::string("key_padding_mask must be bool (true = padding), got ") + c10::toString(m.scalar_type()));
    expect(m.device() == q.device(), "key_padding_mask is on " + m.device().str() + ", q on " + q.device().str());
    checked.mask = m.contiguous();
  }
  checked.scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  expect(std::isfinite(checked.scale), "scale must be finite, got " + std::to_string(checked.scale));
  return checked;
}

#ifdef LONGNET_WITH_CUDA

std::array<at::Tensor, 3> qkv_slots(const at::Tensor& packed, int64_t heads, int64_t kv_heads) {
  const int64_t b = packed.size(0), n = packed.size(1), d = packed.size(2) / (heads + 2 * kv_heads);
  return {packed.narrow(2, 0, heads * d).view({b, n, heads, d}),
          packed.narrow(2, heads * d, kv_heads * d).view({b, n, kv_heads, d}),
          packed.narrow(2, (heads + kv_heads) * d, kv_heads * d).view({b, n, kv_heads, d})};
}

at::Tensor rotate_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& scale,
                       bool transpose, at::Tensor out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.stride(3) == 1 ? x : x.contiguous();
  if (!out.defined()) out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const bool convert = out.scalar_type() != x.scalar_type();
  if (out.sizes() != x.sizes() || out.stride(3) != 1 || out.device() != x.device() ||
      (convert && (x.scalar_type() != at::kFloat || out.scalar_type() == at::kFloat))) {
    throw Error("rotate_cuda: out must be a " + sizes_of(x) + " view on x's device with unit stride over D, of x's "
                "dtype or 16-bit for a float32 x; got " + sizes_of(out) + " " + c10::toString(out.scalar_type()) +
                " for x " + c10::toString(x.scalar_type()));
  }
  kernels::RotaryParams p;
  p.x = xc.data_ptr();
  p.out = out.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.x_strides[d] = xc.stride(d);
    p.out_strides[d] = out.stride(d);
  }
  p.cos = cos.defined() ? cos.data_ptr<float>() : nullptr;
  p.sin = sin.defined() ? sin.data_ptr<float>() : nullptr;
  p.scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
  p.batch = x.size(0);
  p.n = x.size(1);
  p.heads = x.size(2);
  p.head_dim = x.size(3);
  p.transpose = transpose;
  p.dtype = element_type(out.scalar_type());
  p.x_float32 = convert;
  p.stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
  kernels::launch_rotary(p);
  return out;
}

#endif  // LONGNET_WITH_CUDA

}  // namespace longnet::attention
