// One warp per row: the row stays in registers (4 values a lane per 128 columns), so the forward reads x (and the
// residual) once and the backward reads x and dy (and the other gradient of x + a) once. Mean and variance are
// two-pass over the registers. The backward's parameter gradients are per-warp column sums written to `partials`
// (summed by the caller).
#include "fusion/kernels/layer_norm.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention/kernels/cuda_check.h"
#include "attention/kernels/elementwise.cuh"

namespace longnet::fusion::kernels {
namespace {

namespace ew = attention::kernels::elementwise;

constexpr int kWarps = 8;  // warps per block
constexpr int kThreads = 32 * kWarps;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Four 16-bit values as one 8-byte access.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// Lane `lane` holds columns 4·(32·k + lane) .. +3 for k < kChunks; a chunk past the width is absent.
template <int kChunks>
__device__ __forceinline__ bool present(int k, int lane, int64_t width) {
  return 4 * (32 * static_cast<int64_t>(k) + lane) < width;
}

template <typename T>
__device__ __forceinline__ float4 to_float4(const Quad<T>& v) {
  return make_float4(ew::to_float(v.v[0]), ew::to_float(v.v[1]), ew::to_float(v.v[2]), ew::to_float(v.v[3]));
}

template <typename T>
__device__ __forceinline__ float4 load_quad(const Quad<T>* q, int64_t i) {
  const Quad<T> v = q[i];  // one 8-byte load (converting through a reference reads the four halves one by one)
  return to_float4(v);
}

template <typename T>
__device__ __forceinline__ void store_quad(Quad<T>* q, int64_t i, float4 v) {
  Quad<T> out;
  out.v[0] = ew::from_float<T>(v.x);
  out.v[1] = ew::from_float<T>(v.y);
  out.v[2] = ew::from_float<T>(v.z);
  out.v[3] = ew::from_float<T>(v.w);
  q[i] = out;
}

// Four values of the residual stream as loaded: float32, or the 16-bit type.
template <typename TX>
using Vec4 = std::conditional_t<std::is_same_v<TX, float>, float4, Quad<TX>>;

__device__ __forceinline__ float4 to_float4(const float4& v) { return v; }

template <typename TX>
__device__ __forceinline__ void store_vec(TX* row, int64_t i, float4 v) {
  if constexpr (std::is_same_v<TX, float>) {
    reinterpret_cast<float4*>(row)[i] = v;
  } else {
    store_quad(reinterpret_cast<Quad<TX>*>(row), i, v);
  }
}

// v rounded to the 16-bit type and back.
template <typename T>
__device__ __forceinline__ float4 rounded(float4 v) {
  return make_float4(ew::to_float(ew::from_float<T>(v.x)), ew::to_float(ew::from_float<T>(v.y)),
                     ew::to_float(ew::from_float<T>(v.z)), ew::to_float(ew::from_float<T>(v.w)));
}

template <typename T, typename TX, int kChunks, bool kResidual>
__global__ void __launch_bounds__(kThreads) layer_norm_forward_kernel(LayerNormForwardParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.rows) return;
  const Vec4<TX>* x = reinterpret_cast<const Vec4<TX>*>(static_cast<const TX*>(p.x) + row * p.width);
  float4 v[kChunks];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    if (present<kChunks>(k, lane, p.width)) {
      const Vec4<TX> xk = x[32 * k + lane];  // one 16- or 8-byte load
      v[k] = to_float4(xk);
      if constexpr (kResidual) {
        const float4 a = load_quad(reinterpret_cast<const Quad<T>*>(static_cast<const T*>(p.residual) + row * p.width),
                                   32 * k + lane);
        v[k] = make_float4(v[k].x + a.x, v[k].y + a.y, v[k].z + a.z, v[k].w + a.w);
        store_vec(static_cast<TX*>(p.sum) + row * p.width, 32 * k + lane, v[k]);
        // A 16-bit stream normalises the sum as stored, so that the backward's x̂ is the forward's.
        if constexpr (!std::is_same_v<TX, float>) v[k] = rounded<TX>(v[k]);
      }
      sum += (v[k].x + v[k].y) + (v[k].z + v[k].w);
    }
  }
  const float inv_width = 1.f / static_cast<float>(p.width);
  const float mean = warp_sum(sum) * inv_width;
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    if (present<kChunks>(k, lane, p.width)) {
      const float a = v[k].x - mean, b = v[k].y - mean, c = v[k].z - mean, d = v[k].w - mean;
      squares += (a * a + b * b) + (c * c + d * d);
    }
  }
  const float rstd = rsqrtf(warp_sum(squares) * inv_width + p.eps);
  const float4* w = reinterpret_cast<const float4*>(p.weight);
  const float4* b = reinterpret_cast<const float4*>(p.bias);
  Quad<T>* y = reinterpret_cast<Quad<T>*>(static_cast<T*>(p.y) + row * p.width);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    if (present<kChunks>(k, lane, p.width)) {
      const float4 g = w[32 * k + lane], h = b[32 * k + lane];
      store_quad(y, 32 * k + lane,
                 make_float4((v[k].x - mean) * rstd * g.x + h.x, (v[k].y - mean) * rstd * g.y + h.y,
                             (v[k].z - mean) * rstd * g.z + h.z, (v[k].w - mean) * rstd * g.w + h.w));
    }
  }
  if (lane == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

// dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)) with g = dy · weight, x̂ = (x − mean) · rstd; each warp walks rows
// (grid-stride) and keeps its columns' sums of dy · x̂ and dy in registers.
//
// Bandwidth needs many rows in flight, so the registers are kept to 128 and two blocks (16 warps) share an SM:
// the row is held as loaded (x in float32, dy in its 16-bit type), x̂ and g are recomputed in the second pass, and
// the weight is read from L1 each time. (At 154 registers, one block did, and the kernel reached ~60 % of peak
// bandwidth.)
// Up to 768 columns (6 chunks) the kernel fits 128 registers without spilling; wider rows keep one block an SM.
template <typename T, typename TX, int kChunks, bool kResidual>
__global__ void __launch_bounds__(kThreads, kChunks <= 6 ? 2 : 1)
    layer_norm_backward_kernel(LayerNormBackwardParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const float inv_width = 1.f / static_cast<float>(p.width);
  const float4* w = reinterpret_cast<const float4*>(p.weight);
  float4 dw[kChunks] = {}, db[kChunks] = {};
  const bool with_sum = kResidual && p.grad_sum != nullptr;
  for (int64_t row = warp; row < p.rows; row += warps) {
    const Vec4<TX>* x = reinterpret_cast<const Vec4<TX>*>(static_cast<const TX*>(p.x) + row * p.width);
    const Quad<T>* dy = reinterpret_cast<const Quad<T>*>(static_cast<const T*>(p.dy) + row * p.width);
    const Vec4<TX>* grad_sum =  // with_sum only
        reinterpret_cast<const Vec4<TX>*>(static_cast<const TX*>(p.grad_sum) + row * p.width);
    const float mean = p.mean[row], rstd = p.rstd[row];
    Vec4<TX> xv[kChunks];
    Quad<T> dq[kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (present<kChunks>(k, lane, p.width)) {
        xv[k] = x[32 * k + lane];
        dq[k] = dy[32 * k + lane];
      }
    }
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (present<kChunks>(k, lane, p.width)) {
        const float4 d = to_float4(dq[k]), wk = w[32 * k + lane], xf = to_float4(xv[k]);
        const float4 xh = make_float4((xf.x - mean) * rstd, (xf.y - mean) * rstd, (xf.z - mean) * rstd,
                                      (xf.w - mean) * rstd);
        const float4 g = make_float4(d.x * wk.x, d.y * wk.y, d.z * wk.z, d.w * wk.w);
        sum_g += (g.x + g.y) + (g.z + g.w);
        sum_gx += (g.x * xh.x + g.y * xh.y) + (g.z * xh.z + g.w * xh.w);
        dw[k].x += d.x * xh.x;
        dw[k].y += d.y * xh.y;
        dw[k].z += d.z * xh.z;
        dw[k].w += d.w * xh.w;
        db[k].x += d.x;
        db[k].y += d.y;
        db[k].z += d.z;
        db[k].w += d.w;
      }
    }
    const float mg = warp_sum(sum_g) * inv_width, mgx = warp_sum(sum_gx) * inv_width;
    TX* dx = static_cast<TX*>(p.dx) + row * p.width;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (present<kChunks>(k, lane, p.width)) {
        const float4 dv = to_float4(dq[k]), wk = w[32 * k + lane], xf = to_float4(xv[k]);
        const float4 xh = make_float4((xf.x - mean) * rstd, (xf.y - mean) * rstd, (xf.z - mean) * rstd,
                                      (xf.w - mean) * rstd);
        const float4 g = make_float4(dv.x * wk.x, dv.y * wk.y, dv.z * wk.z, dv.w * wk.w);
        float4 d = make_float4(rstd * (g.x - mg - xh.x * mgx), rstd * (g.y - mg - xh.y * mgx),
                               rstd * (g.z - mg - xh.z * mgx), rstd * (g.w - mg - xh.w * mgx));
        if constexpr (kResidual) {
          if (with_sum) {
            const float4 gs = to_float4(grad_sum[32 * k + lane]);
            // __fadd_rn: never contracted with the products in d into an FMA, so the sum is bit for bit what the
            // unfused add of the two gradients gives.
            d = make_float4(__fadd_rn(gs.x, d.x), __fadd_rn(gs.y, d.y), __fadd_rn(gs.z, d.z), __fadd_rn(gs.w, d.w));
          }
          // A 16-bit stream's dx is a's gradient too (grad_residual is dx).
          if constexpr (std::is_same_v<TX, float>) {
            store_quad(reinterpret_cast<Quad<T>*>(static_cast<T*>(p.grad_residual) + row * p.width), 32 * k + lane,
                       d);
          }
        }
        store_vec(dx, 32 * k + lane, d);
      }
    }
  }
  float4* out = reinterpret_cast<float4*>(p.partials + warp * 2 * p.width);
  const int64_t half = p.width / 4;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    if (present<kChunks>(k, lane, p.width)) {
      out[32 * k + lane] = dw[k];
      out[half + 32 * k + lane] = db[k];
    }
  }
}

// Asked of the driver once per device: every backward sizes its grid (and its caller the partials) from it.
int device_sms() {
  static std::array<std::atomic<int>, 64> known{};
  int device = 0;
  LONGNET_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < static_cast<int>(known.size());
  int sms = cached ? known[static_cast<size_t>(device)].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    LONGNET_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (cached) known[static_cast<size_t>(device)].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

void check_width(const char* launcher, int64_t width) {
  if (width < 4 || width > kLayerNormMaxWidth || width % 4 != 0) {
    throw std::invalid_argument(std::string(launcher) + ": width must be a multiple of 4 in [4, " +
                                std::to_string(kLayerNormMaxWidth) + "], got " + std::to_string(width));
  }
}

void check_pointers(const char* launcher, std::initializer_list<const void*> pointers) {
  for (const void* ptr : pointers) {
    if (ptr == nullptr || !ew::aligned(ptr, 16)) {
      throw std::invalid_argument(std::string(launcher) + ": every pointer must be a 16-byte aligned device pointer");
    }
  }
}

// f(std::integral_constant<int, kChunks>) for the chunk count of `width`.
template <typename F>
void with_chunks(int64_t width, F&& f) {
  switch ((width + 127) / 128) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// f(T{}, TX{}, std::integral_constant<int, kChunks>{}, std::bool_constant<residual>{}): the launchers' dispatch over
// the 16-bit type, the stream's type (float32 or that 16-bit type), the chunk count of `width` and the residual
// variant.
template <typename F>
void dispatch(const char* launcher, ElementType type, ElementType stream, int64_t width, bool residual, F&& f) {
  if (type == ElementType::float32) {
    throw std::invalid_argument(std::string(launcher) + ": the 16-bit side must be float16 or bfloat16");
  }
  if (stream != ElementType::float32 && stream != type) {
    throw std::invalid_argument(std::string(launcher) + ": the stream must be float32 or the 16-bit type");
  }
  ew::with_element_type(type, [&](auto element) {
    using T = decltype(element);
    if constexpr (!std::is_same_v<T, float>) {
      const auto with_stream = [&](auto x) {
        with_chunks(width, [&](auto chunks) {
          if (residual) {
            f(element, x, chunks, std::true_type{});
          } else {
            f(element, x, chunks, std::false_type{});
          }
        });
      };
      if (stream == ElementType::float32) {
        with_stream(float{});
      } else {
        with_stream(T{});
      }
    }
  });
}

}  // namespace

int64_t layer_norm_partial_rows(int64_t rows) {
  const int64_t blocks = std::clamp<int64_t>((rows + kWarps - 1) / kWarps, 1, 4 * static_cast<int64_t>(device_sms()));
  return blocks * kWarps;
}

void launch_layer_norm_forward(const LayerNormForwardParams& p) {
  check_width("launch_layer_norm_forward", p.width);
  if (p.rows < 0) throw std::invalid_argument("launch_layer_norm_forward: rows must be >= 0");
  if (p.rows == 0) return;
  check_pointers("launch_layer_norm_forward", {p.x, p.weight, p.bias, p.y, p.mean, p.rstd});
  const bool residual = p.residual != nullptr;
  if (residual) check_pointers("launch_layer_norm_forward", {p.residual, p.sum});
  const unsigned grid = ew::grid_for("launch_layer_norm_forward", p.rows * 32, kThreads);
  dispatch("launch_layer_norm_forward", p.dtype, p.x_dtype, p.width, residual,
           [&](auto element, auto x, auto chunks, auto with_residual) {
             layer_norm_forward_kernel<decltype(element), decltype(x), decltype(chunks)::value,
                                       decltype(with_residual)::value><<<grid, kThreads, 0, p.stream>>>(p);
           });
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

void launch_layer_norm_backward(const LayerNormBackwardParams& p) {
  check_width("launch_layer_norm_backward", p.width);
  if (p.rows < 0) throw std::invalid_argument("launch_layer_norm_backward: rows must be >= 0");
  if (p.rows == 0) return;
  check_pointers("launch_layer_norm_backward", {p.dy, p.x, p.weight, p.mean, p.rstd, p.dx, p.partials});
  const bool residual = p.grad_residual != nullptr;
  if (residual) check_pointers("launch_layer_norm_backward", {p.grad_residual});
  if (residual && p.x_dtype != ElementType::float32 && p.grad_residual != p.dx) {
    throw std::invalid_argument("launch_layer_norm_backward: with a 16-bit stream, grad_residual must be dx");
  }
  if (p.grad_sum != nullptr) {
    if (!residual) throw std::invalid_argument("launch_layer_norm_backward: grad_sum needs grad_residual");
    check_pointers("launch_layer_norm_backward", {p.grad_sum});
  }
  const auto grid = static_cast<unsigned>(layer_norm_partial_rows(p.rows) / kWarps);
  dispatch("launch_layer_norm_backward", p.dtype, p.x_dtype, p.width, residual,
           [&](auto element, auto x, auto chunks, auto with_residual) {
             layer_norm_backward_kernel<decltype(element), decltype(x), decltype(chunks)::value,
                                        decltype(with_residual)::value><<<grid, kThreads, 0, p.stream>>>(p);
           });
  LONGNET_CUDA_CHECK(cudaGetLastError());
}

}  // namespace longnet::fusion::kernels
