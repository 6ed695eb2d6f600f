// GPU tests of the flash backend (attention/flash_backend.h) and its combine_by_lse kernel, and of the fused backend
// (attention/fused_backend.h) against the same oracle cases. Registered as their own
// suite with the `gpu` label: every test REQUIREs a CUDA device, so on a machine without one they fail, never pass.
// Assertions use Catch's REQUIRE family only: torch's headers define their own fatal CHECK macro.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <cstdint>
#include <limits>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <torch/torch.h>

#include "attention/dilated_attention.h"
#include "attention/flash_backend.h"
#include "attention/fused_backend.h"
#include "attention/kernels/lse_combine.h"
#include "attention/positional.h"
#include "attention/reference.h"
#include "core/error.h"
#include "tests/support/oracle.h"

using longnet::attention::AttentionOptions;
using longnet::attention::DilatedAttentionConfig;
using longnet::attention::Mix;
using longnet::attention::flash_backend_supports;
using longnet::attention::flash_dilated_attention;
using longnet::attention::fused_backend_supports;
using longnet::attention::fused_dilated_attention;
using longnet::attention::reference_dilated_attention;
using longnet::test::oracle_dilated_attention;
using longnet::test::relative_error;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// bf16/fp16 inputs against the float64 oracle (tests/support/oracle.h) on the same rounded inputs: outputs and
// gradients are softmax-weighted sums, so the error is a few units of bf16's 2^-8 relative to the tensor's largest
// entry (measured on an H200: at most 6.6e-3 for bf16 and 7e-4 for fp16 over these cases, on either engine).
constexpr double kTolerance = 2e-2;

void require_gpu() { REQUIRE(torch::cuda::is_available()); }

// Sets an environment variable for a scope ("" unsets it) and restores the old value.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    set(value.empty() ? std::nullopt : std::optional<std::string>(value));
  }
  ~ScopedEnv() { set(old_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  void set(const std::optional<std::string>& value) {
    if (value) {
      setenv(name_, value->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  const char* name_;
  std::optional<std::string> old_;
};

// The fused engine forced through LONGNET_FLASH_ENGINE ("" when the backend chooses).
std::string forced_engine() {
  const char* e = std::getenv("LONGNET_FLASH_ENGINE");
  return e != nullptr ? e : "";
}

enum class Padding { none, right, left };

struct Case {
  int64_t batch = 1, n = 256, heads = 4, kv_heads = 4, head_dim = 64;
  std::vector<int64_t> segments{64}, rates{1};
  bool causal = false;
  Padding padding = Padding::none;
  at::ScalarType dtype = at::kBFloat16;
  uint64_t seed = 0;
  Mix mix = Mix::lse;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  os << "B=" << c.batch << " N=" << c.n << " H=" << c.heads << " Hkv=" << c.kv_heads << " D=" << c.head_dim
     << " w={";
  for (size_t i = 0; i < c.segments.size(); ++i) os << (i ? "," : "") << c.segments[i];
  os << "} r={";
  for (size_t i = 0; i < c.rates.size(); ++i) os << (i ? "," : "") << c.rates[i];
  const char* padding = c.padding == Padding::none ? "none" : c.padding == Padding::right ? "right" : "left";
  return os << "} causal=" << c.causal << " padding=" << padding << " dtype=" << c10::toString(c.dtype)
            << " seed=" << c.seed << " mix=" << longnet::attention::to_string(c.mix);
}

std::vector<Case> hand_picked_cases() {
  std::vector<Case> cases;
  auto add = [&cases](Case c) { cases.push_back(std::move(c)); };
  add({.batch = 2, .n = 256, .heads = 4, .kv_heads = 4, .segments = {64, 128}, .rates = {1, 2}});
  add({.n = 512, .heads = 6, .kv_heads = 6, .segments = {128, 256, 512}, .rates = {1, 2, 4}, .causal = true});
  // ragged last segment (300 = 4·64 + 44 = 2·128 + 44)
  add({.batch = 2, .n = 300, .head_dim = 32, .segments = {64, 128}, .rates = {1, 2}, .causal = true});
  // r > heads: offsets ≥ H select no head, and rows ≢ h (mod 8) of the r = 8 branch come from r = 1 only
  add({.n = 256, .heads = 2, .kv_heads = 2, .segments = {64, 256}, .rates = {1, 8}});
  // r > heads with no r = 1 branch: most rows are covered by no branch (out 0, lse -inf)
  add({.n = 128, .heads = 2, .kv_heads = 2, .segments = {64}, .rates = {4}});
  // grouped-query heads whose kv heads are not evenly spaced per offset (G = 4, r = 3: heads 0, 3, 6 → kv 0, 0, 1)
  add({.batch = 2, .n = 256, .heads = 8, .kv_heads = 2, .segments = {96, 32}, .rates = {3, 1}});
  add({.n = 256, .heads = 8, .kv_heads = 4, .segments = {128}, .rates = {2}, .causal = true});
  add({.batch = 2, .n = 256, .segments = {64, 128}, .rates = {1, 2}, .padding = Padding::right});
  // left padding + causal: the first queries of batch 0 have no key at all
  add({.batch = 2, .n = 192, .segments = {64, 192}, .rates = {1, 4}, .causal = true, .padding = Padding::left});
  // one-row calls (ragged tail of 3 tokens, r = 4) run on flash even under cuDNN; with padding their key is removed
  add({.batch = 2, .n = 51, .heads = 2, .kv_heads = 2, .segments = {16, 64}, .rates = {4, 1}, .causal = true,
       .padding = Padding::right});
  // w > N clamped to N (and then r does not divide the clamped w)
  add({.n = 200, .segments = {1024, 64}, .rates = {2, 1}});
  add({.n = 100, .heads = 8, .kv_heads = 8, .segments = {512}, .rates = {8}, .causal = true});
  add({.n = 512, .heads = 6, .kv_heads = 6, .segments = {128, 256, 512}, .rates = {1, 2, 4}, .causal = true,
       .dtype = at::kHalf});
  add({.batch = 2, .n = 256, .heads = 8, .kv_heads = 2, .segments = {96, 32}, .rates = {3, 1}, .dtype = at::kHalf});
  add({.n = 256, .heads = 4, .kv_heads = 4, .head_dim = 128, .segments = {64, 256}, .rates = {1, 4},
       .causal = true});
  // D > 128 runs on torch's flash kernel instead of cuDNN
  add({.batch = 2, .n = 256, .heads = 2, .kv_heads = 2, .head_dim = 256, .segments = {64, 128}, .rates = {1, 2},
       .causal = true});
  // head_split: each group of heads runs its own branch (groups of 2, 1, 2, 1 heads for H = 6, K = 4 …)
  add({.batch = 2, .n = 256, .heads = 4, .kv_heads = 4, .segments = {64, 128}, .rates = {1, 2}, .mix = Mix::head_split});
  add({.n = 300, .heads = 6, .kv_heads = 6, .segments = {64, 128, 256, 512}, .rates = {1, 2, 4, 8}, .causal = true,
       .mix = Mix::head_split});
  add({.batch = 2, .n = 256, .heads = 8, .kv_heads = 2, .segments = {96, 32}, .rates = {3, 1},
       .padding = Padding::right, .mix = Mix::head_split});
  add({.n = 200, .heads = 3, .kv_heads = 3, .segments = {1024, 64, 32}, .rates = {2, 1, 4}, .dtype = at::kHalf,
       .mix = Mix::head_split});
  // Several query and key tiles per segment (the fused kernels' tiles are 128 queries × 64 keys forward, 128 × 128
  // with wgmma on Hopper, 64 × 64 backward): long sparse segments, causal, a ragged tail that ends inside a tile,
  // padding across tiles.
  add({.n = 2048, .heads = 4, .kv_heads = 4, .segments = {512, 2048}, .rates = {1, 4}, .causal = true});
  add({.batch = 2, .n = 1500, .heads = 4, .kv_heads = 2, .segments = {1024, 256}, .rates = {2, 1},
       .padding = Padding::right});
  add({.n = 1100, .heads = 3, .kv_heads = 3, .head_dim = 128, .segments = {1024, 512}, .rates = {1, 2},
       .causal = true, .padding = Padding::left});
  add({.batch = 2, .n = 1000, .heads = 2, .kv_heads = 1, .segments = {1024, 300}, .rates = {1, 3}, .causal = true,
       .padding = Padding::left, .dtype = at::kHalf});
  // Ragged tiles the Hopper kernels skip in part: 784 rows at r = 2 (the last key and query tiles hold 16), and a
  // 196-row segment (68 in its second tile), as in the video stack of experiments/video_text_gpu.toml.
  add({.n = 1568, .heads = 4, .kv_heads = 4, .segments = {196, 1568}, .rates = {1, 2}});
  add({.batch = 2, .n = 1568, .heads = 4, .kv_heads = 2, .segments = {196, 1568}, .rates = {1, 2}, .causal = true,
       .padding = Padding::right});
  return cases;
}

// Randomized problems: shapes, branches, causal, padding and dtype drawn from a seeded generator.
Case random_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto pick = [&rng](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  Case c;
  c.seed = seed;
  c.batch = pick(1, 2);
  c.heads = pick(1, 8);
  std::vector<int64_t> divisors;
  for (int64_t d = 1; d <= c.heads; ++d) {
    if (c.heads % d == 0) divisors.push_back(d);
  }
  c.kv_heads = divisors[pick(0, static_cast<int64_t>(divisors.size()) - 1)];
  const int64_t dims[] = {32, 64, 128};
  c.head_dim = dims[pick(0, 2)];
  c.n = pick(17, 400);
  const int64_t branches = pick(1, 3);
  c.segments.clear();
  c.rates.clear();
  for (int64_t i = 0; i < branches; ++i) {
    const int64_t w = int64_t{16} << pick(0, 4);
    int64_t r = int64_t{1} << pick(0, 3);
    while (w % r != 0) r /= 2;
    c.segments.push_back(w);
    c.rates.push_back(r);
  }
  c.causal = pick(0, 1) == 1;
  c.padding = static_cast<Padding>(pick(0, 2));
  c.dtype = pick(0, 3) == 0 ? at::kHalf : at::kBFloat16;
  if (pick(0, 2) == 0 && c.heads >= branches) c.mix = Mix::head_split;
  return c;
}

at::Tensor padding_mask(const Case& c) {
  auto mask = torch::zeros({c.batch, c.n}, torch::dtype(torch::kBool));
  if (c.padding == Padding::none) return mask;
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t pad = b == 0 ? c.n / 3 : c.n / 7;
    if (c.padding == Padding::right) {
      mask[b].narrow(0, c.n - pad, pad).fill_(true);
    } else {
      mask[b].narrow(0, 0, pad).fill_(true);
    }
  }
  return mask;
}

DilatedAttentionConfig config_of(const Case& c) {
  DilatedAttentionConfig config;
  config.segment_lengths = c.segments;
  config.dilation_rates = c.rates;
  config.causal = c.causal;
  config.mix = c.mix;
  return config;
}

}  // namespace

TEST_CASE("flash and fused backends match the float64 oracle: forward, LSE, dq, dk, dv", "[attention][cuda]") {
  require_gpu();
  std::vector<Case> cases = hand_picked_cases();
  for (uint64_t seed = 1; seed <= 20; ++seed) cases.push_back(random_case(seed));
  // "fused" takes the device's choices (on Hopper: our TMA/wgmma kernels both ways), "fused-flash" the device's
  // forward and the flash backend's backward, "fused-portable" our mma.sync kernels both ways.
  const std::string backend = GENERATE(as<std::string>{}, "flash", "fused", "fused-flash", "fused-portable");
  const bool fused = backend != "flash";
  const ScopedEnv forward("LONGNET_FUSED_FORWARD", backend == "fused-portable" ? "portable" : "");
  const ScopedEnv backward("LONGNET_FUSED_BACKWARD", backend == "fused-flash"      ? "flash"
                                                     : backend == "fused-portable" ? "kernel"
                                                                                   : "");
  Case c = GENERATE_COPY(from_range(cases));
  // The fused kernels are built for D = 64 and 128: other cases run there with D = 64.
  if (fused && c.head_dim != 64 && c.head_dim != 128) c.head_dim = 64;
  CAPTURE(c, backend);

  torch::manual_seed(static_cast<uint64_t>(c.seed * 7919 + c.n));
  const auto dev = torch::Device(torch::kCUDA);
  const auto opts = torch::TensorOptions().device(dev).dtype(c.dtype);
  // Inputs are drawn in the test dtype; the reference gets the same rounded values in float32.
  const auto q = torch::randn({c.batch, c.n, c.heads, c.head_dim}, opts).requires_grad_();
  const auto k = torch::randn({c.batch, c.n, c.kv_heads, c.head_dim}, opts).requires_grad_();
  const auto v = torch::randn({c.batch, c.n, c.kv_heads, c.head_dim}, opts).requires_grad_();
  const auto dout = torch::randn({c.batch, c.n, c.heads, c.head_dim}, opts);

  const DilatedAttentionConfig config = config_of(c);
  AttentionOptions options;
  if (c.padding != Padding::none) options.key_padding_mask = padding_mask(c).to(dev);

  std::string why;
  if (fused) {
    REQUIRE(fused_backend_supports(q, options, &why));
  } else {
    REQUIRE(flash_backend_supports(q, options, &why));
    if (options.key_padding_mask && forced_engine() == "flash") {
      REQUIRE_THROWS_WITH(flash_dilated_attention(q, k, v, config, options), Catch::Contains("key_padding_mask"));
      return;
    }
  }

  const auto flash = fused ? fused_dilated_attention(q, k, v, config, options)
                           : flash_dilated_attention(q, k, v, config, options);
  REQUIRE(flash.out.scalar_type() == c.dtype);
  REQUIRE(flash.lse.scalar_type() == at::kFloat);
  REQUIRE(flash.out.sizes() == q.sizes());
  REQUIRE(flash.lse.sizes() == at::IntArrayRef{c.batch, c.heads, c.n});
  flash.out.backward(dout);

  // The float64 oracle (CPU) on the same rounded inputs: the definition the pass criterion uses.
  AttentionOptions cpu_options;
  if (options.key_padding_mask) cpu_options.key_padding_mask = options.key_padding_mask->cpu();
  const auto q64 = q.detach().cpu().to(at::kDouble).requires_grad_();
  const auto k64 = k.detach().cpu().to(at::kDouble).requires_grad_();
  const auto v64 = v.detach().cpu().to(at::kDouble).requires_grad_();
  const auto oracle = oracle_dilated_attention(q64, k64, v64, config, cpu_options);
  oracle.out.backward(dout.cpu().to(at::kDouble));

  // The reference backend in float32 on the GPU, for comparison.
  const auto q32 = q.detach().to(at::kFloat).requires_grad_();
  const auto k32 = k.detach().to(at::kFloat).requires_grad_();
  const auto v32 = v.detach().to(at::kFloat).requires_grad_();
  const auto ref = reference_dilated_attention(q32, k32, v32, config, options);
  ref.out.backward(dout.to(at::kFloat));

  const double e_out = relative_error(flash.out, oracle.out);
  const double e_lse = relative_error(flash.lse, oracle.lse);
  const double e_dq = relative_error(q.grad(), q64.grad());
  const double e_dk = relative_error(k.grad(), k64.grad());
  const double e_dv = relative_error(v.grad(), v64.grad());
  const double ref_out = relative_error(ref.out, oracle.out), ref_dq = relative_error(q32.grad(), q64.grad());
  const double vs_ref_out = relative_error(flash.out, ref.out), vs_ref_dq = relative_error(q.grad(), q32.grad());
  std::cout << "[" << backend << " vs oracle] " << c << " engine="
            << (fused ? backend : forced_engine().empty() ? "auto" : forced_engine())
            << " out " << e_out << " lse " << e_lse << " dq " << e_dq << " dk " << e_dk << " dv " << e_dv
            << " | reference(f32, gpu) vs oracle: out " << ref_out << " dq " << ref_dq << " | flash vs reference: out "
            << vs_ref_out << " dq " << vs_ref_dq << "\n";
  CAPTURE(e_out, e_lse, e_dq, e_dk, e_dv, ref_out, ref_dq);
  REQUIRE(e_out <= kTolerance);
  REQUIRE(e_lse <= kTolerance);
  REQUIRE(e_dq <= kTolerance);
  REQUIRE(e_dk <= kTolerance);
  REQUIRE(e_dv <= kTolerance);
}

// The fused engines alone, on the strided views the backend builds (rows o::r of segments, heads o::r), against
// float32 math: isolates an engine problem from the backend's bookkeeping.
TEST_CASE("fused engines on strided sparse views match float32 math", "[attention][cuda]") {
  require_gpu();
  const int64_t L = GENERATE(int64_t{64}, int64_t{256}, int64_t{2048});
  const bool use_cudnn = GENERATE(true, false);
  const int64_t B = 2, H = 4, D = 64, r = 2, o = 1, w = L * r, S = 3, N = S * w;
  CAPTURE(L, use_cudnn);
  torch::manual_seed(5);
  const auto x = torch::randn({3, B, N, H, D}, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16));
  auto view = [&](const at::Tensor& t) {  // (B, N, H, D) -> (B·S, H/r, L, D), zero-copy
    return t.view({B, S, w, H, D}).slice(2, o, w, r).slice(3, o, H, r).permute({0, 1, 3, 2, 4}).reshape(
        {B * S, H / r, L, D});
  };
  const auto q = view(x[0]), k = view(x[1]), v = view(x[2]);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  at::Tensor out, lse;
  if (use_cudnn) {
    auto res = at::_scaled_dot_product_cudnn_attention(q, k, v, std::nullopt, true, 0.0, false, false, scale);
    out = std::get<0>(res);
    lse = std::get<1>(res).reshape({B * S, H / r, L});
  } else {
    auto res = at::_scaled_dot_product_flash_attention(q, k, v, 0.0, false, false, scale);
    out = std::get<0>(res);
    lse = std::get<1>(res);
  }
  const auto s = at::matmul(q.to(at::kFloat), k.to(at::kFloat).transpose(-1, -2)) * scale;
  const auto expected_lse = at::logsumexp(s, -1);
  const auto expected_out = at::matmul(at::softmax(s, -1), v.to(at::kFloat));
  const double e_out = relative_error(out, expected_out), e_lse = relative_error(lse, expected_lse);
  std::cout << "[engine] cudnn=" << use_cudnn << " L=" << L << " out " << e_out << " lse " << e_lse
            << " out strides " << out.strides() << " lse sizes " << lse.sizes() << "\n";
  REQUIRE(e_out <= 1e-2);
  REQUIRE(e_lse <= 1e-3);
}

TEST_CASE("flash backend forward under no-grad equals the forward of the differentiable call", "[attention][cuda]") {
  require_gpu();
  torch::manual_seed(3);
  const auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  const auto q = torch::randn({1, 1024, 4, 64}, opts);
  const auto k = torch::randn({1, 1024, 4, 64}, opts);
  const auto v = torch::randn({1, 1024, 4, 64}, opts);
  DilatedAttentionConfig config;
  config.segment_lengths = {256, 512, 1024};
  config.dilation_rates = {1, 2, 4};
  const auto with_grad = flash_dilated_attention(q.clone().requires_grad_(), k, v, config, {});
  torch::NoGradGuard no_grad;
  const auto without = flash_dilated_attention(q, k, v, config, {});
  REQUIRE(torch::equal(with_grad.out.detach(), without.out));
  REQUIRE(torch::equal(with_grad.lse, without.lse));
  REQUIRE_FALSE(with_grad.lse.requires_grad());
}

TEST_CASE("combine_by_lse kernel matches logaddexp math on strided views", "[attention][cuda]") {
  require_gpu();
  using longnet::attention::kernels::ElementType;
  using longnet::attention::kernels::LseCombineParams;
  // dtype × head_dim: 16-byte vector path (D % 8 == 0) and the scalar path (D = 18 for bf16, 18 for float32).
  const auto dtype = GENERATE(at::kFloat, at::kBFloat16, at::kHalf);
  const int64_t D = GENERATE(int64_t{64}, int64_t{18}, int64_t{256});
  CAPTURE(c10::toString(dtype), D);
  torch::manual_seed(11);
  const auto dev = torch::Device(torch::kCUDA);
  const auto f32 = torch::TensorOptions().device(dev).dtype(torch::kFloat);
  const int64_t rows[4] = {2, 3, 4, 5};

  // Running out and lse as transposed (non-contiguous) views; the branch operands contiguous.
  auto out = torch::randn({2, 3, 5, 4, D}, f32).to(dtype).transpose(2, 3);
  auto lse = (3 * torch::randn({2, 3, 5, 4}, f32)).transpose(2, 3);
  const auto out_i = torch::randn({2, 3, 4, 5, D}, f32).to(dtype);
  auto lse_i = 3 * torch::randn({2, 3, 4, 5}, f32);
  // Empty running rows, and branch rows without keys (-inf) or from an all-masked fused call (NaN).
  lse.select(3, 0).fill_(-kInf);
  lse_i.select(3, 1).fill_(-kInf);
  lse_i.select(3, 2).select(2, 0).fill_(std::numeric_limits<double>::quiet_NaN());
  lse_i.select(3, 0).select(2, 1).fill_(-kInf);  // both empty
  // An empty running row holds zeros (as the backend initialises it).
  out.select(3, 0).zero_();

  // Expected, in float32 torch ops.
  const auto o32 = out.to(torch::kFloat), oi32 = out_i.to(torch::kFloat);
  const auto valid = lse_i > -kInf;  // false for -inf and NaN
  const auto l_new = torch::where(valid, lse_i, torch::full_like(lse_i, -kInf));
  const auto l_out = torch::logaddexp(lse, l_new);
  const auto w_run = torch::where(lse > -kInf, torch::exp(lse - l_out), torch::zeros_like(lse));
  const auto w_new = torch::where(valid, torch::exp(l_new - l_out), torch::zeros_like(lse));
  const auto expected_out =
      torch::where(valid.unsqueeze(-1), w_run.unsqueeze(-1) * o32 + w_new.unsqueeze(-1) * oi32, o32);
  const auto expected_lse = torch::where(valid, l_out, lse);

  LseCombineParams p;
  p.out = out.data_ptr();
  p.out_i = out_i.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.lse_i = lse_i.data_ptr<float>();
  for (int d = 0; d < 4; ++d) {
    p.rows[d] = rows[d];
    p.out_strides[d] = out.stride(d);
    p.out_i_strides[d] = out_i.stride(d);
    p.lse_strides[d] = lse.stride(d);
    p.lse_i_strides[d] = lse_i.stride(d);
  }
  p.head_dim = D;
  p.dtype = dtype == at::kFloat ? ElementType::float32 : dtype == at::kHalf ? ElementType::float16
                                                                           : ElementType::bfloat16;
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  longnet::attention::kernels::launch_lse_combine_fwd(p);
  torch::cuda::synchronize();

  const double tol = dtype == at::kFloat ? 1e-5 : dtype == at::kHalf ? 2e-3 : 1e-2;
  REQUIRE(relative_error(out.to(torch::kFloat), expected_out) <= tol);
  REQUIRE(relative_error(lse, expected_lse) <= 1e-5);
  REQUIRE_FALSE(torch::isnan(out.to(torch::kFloat)).any().item<bool>());
  // Rows that took nothing are untouched, bit for bit.
  const auto untouched = torch::logical_not(valid).unsqueeze(-1).expand_as(o32);
  REQUIRE(torch::equal(out.to(torch::kFloat).masked_select(untouched), o32.masked_select(untouched)));
}

TEST_CASE("flash backend reports what it cannot run and names bad arguments", "[attention][cuda]") {
  require_gpu();
  const auto cuda_bf16 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  const auto q = torch::randn({1, 64, 2, 64}, cuda_bf16);
  std::string why;

  REQUIRE_FALSE(flash_backend_supports(q.cpu(), {}, &why));
  REQUIRE_THAT(why, Catch::Contains("CUDA tensor"));
  REQUIRE_FALSE(flash_backend_supports(q.to(torch::kFloat), {}, &why));
  REQUIRE_THAT(why, Catch::Contains("bfloat16 or float16"));
  REQUIRE_FALSE(flash_backend_supports(torch::randn({1, 64, 2, 12}, cuda_bf16), {}, &why));
  REQUIRE_THAT(why, Catch::Contains("head dim"));
  AttentionOptions with_bias;
  with_bias.relative_bias = longnet::attention::RelativePositionBias{torch::zeros({2, 32}, cuda_bf16)};
  REQUIRE_FALSE(flash_backend_supports(q, with_bias, &why));
  REQUIRE_THAT(why, Catch::Contains("relative position bias"));

  DilatedAttentionConfig config;
  config.segment_lengths = {32};
  const auto k_bad = torch::randn({1, 32, 2, 64}, cuda_bf16);
  REQUIRE_THROWS_WITH(flash_dilated_attention(q, k_bad, k_bad, config, {}), Catch::Contains("k must be"));
  const auto k3 = torch::randn({1, 64, 3, 64}, cuda_bf16);
  REQUIRE_THROWS_WITH(flash_dilated_attention(q, k3, k3, config, {}), Catch::Contains("multiple of k's heads"));
  AttentionOptions bad_mask;
  bad_mask.key_padding_mask = torch::zeros({1, 64}, torch::TensorOptions().device(torch::kCUDA));
  REQUIRE_THROWS_WITH(flash_dilated_attention(q, q, q, config, bad_mask), Catch::Contains("key_padding_mask"));
}

TEST_CASE("fused backend reports what it cannot run and is what auto picks on Hopper", "[attention][cuda]") {
  require_gpu();
  const auto cuda_bf16 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  const auto q = torch::randn({1, 64, 2, 64}, cuda_bf16);
  std::string why;
  REQUIRE(fused_backend_supports(q, {}, &why));
  REQUIRE_FALSE(fused_backend_supports(torch::randn({1, 64, 2, 32}, cuda_bf16), {}, &why));
  REQUIRE_THAT(why, Catch::Contains("D = 64 and 128"));
  REQUIRE_FALSE(fused_backend_supports(q.to(torch::kFloat), {}, &why));
  REQUIRE_THAT(why, Catch::Contains("bfloat16 or float16"));

  DilatedAttentionConfig config;
  config.segment_lengths = {32};
  const auto k_bad = torch::randn({1, 32, 2, 64}, cuda_bf16);
  REQUIRE_THROWS_WITH(fused_dilated_attention(q, k_bad, k_bad, config, {}),
                      Catch::Contains("fused attention backend") && Catch::Contains("k must be"));

  // `auto`: fused where its forward is the Hopper kernel (compute capability 9.x and D = 64; GPU test builds include
  // the default sm_90a target), flash elsewhere, and for D = 128, whose fused forward is the mma.sync one.
  using longnet::attention::Backend;
  using longnet::attention::resolve_backend;
  const bool hopper = at::cuda::getCurrentDeviceProperties()->major == 9;
  REQUIRE(longnet::attention::fused_backend_preferred(q, {}) == hopper);
  REQUIRE(resolve_backend(q, config, {}) == (hopper ? Backend::fused : Backend::flash));
  REQUIRE(resolve_backend(q.to(torch::kHalf), config, {}) == (hopper ? Backend::fused : Backend::flash));
  REQUIRE(resolve_backend(torch::randn({1, 64, 2, 128}, cuda_bf16), config, {}) == Backend::flash);
  REQUIRE(resolve_backend(q.to(torch::kFloat), config, {}) == Backend::reference);
  config.backend = longnet::attention::Backend::fused;
  REQUIRE_THROWS_WITH(longnet::attention::dilated_attention(torch::randn({1, 64, 2, 32}, cuda_bf16),
                                                           torch::randn({1, 64, 2, 32}, cuda_bf16),
                                                           torch::randn({1, 64, 2, 32}, cuda_bf16), config, {}),
                      Catch::Contains("fused backend cannot run"));
}

// The benchmark's branch pattern at a smaller scale (5 branches, w/r = 256 rows, 12 heads): many tiles per segment,
// against the reference backend in float32 on the same rounded inputs.
TEST_CASE("fused backend matches the float32 reference on a LongNet branch pattern", "[attention][cuda]") {
  require_gpu();
  const bool causal = GENERATE(false, true);
  // The device's backward (our kernel) and the flash backend's.
  const std::string backward = GENERATE(as<std::string>{}, "", "flash");
  const ScopedEnv engine("LONGNET_FUSED_BACKWARD", backward);
  CAPTURE(causal, backward);
  torch::manual_seed(17);
  const auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  const int64_t B = 1, N = 8192, H = 12, D = 64;
  const auto q = torch::randn({B, N, H, D}, opts).requires_grad_();
  const auto k = torch::randn({B, N, H, D}, opts).requires_grad_();
  const auto v = torch::randn({B, N, H, D}, opts).requires_grad_();
  const auto dout = torch::randn({B, N, H, D}, opts);
  DilatedAttentionConfig config;
  config.segment_lengths = {256, 512, 1024, 2048, 4096};
  config.dilation_rates = {1, 2, 4, 8, 16};
  config.causal = causal;
  const auto fused = fused_dilated_attention(q, k, v, config, {});
  fused.out.backward(dout);
  const auto q32 = q.detach().to(at::kFloat).requires_grad_();
  const auto k32 = k.detach().to(at::kFloat).requires_grad_();
  const auto v32 = v.detach().to(at::kFloat).requires_grad_();
  const auto ref = reference_dilated_attention(q32, k32, v32, config, {});
  ref.out.backward(dout.to(at::kFloat));
  const double e_out = relative_error(fused.out, ref.out), e_lse = relative_error(fused.lse, ref.lse);
  const double e_dq = relative_error(q.grad(), q32.grad()), e_dk = relative_error(k.grad(), k32.grad());
  const double e_dv = relative_error(v.grad(), v32.grad());
  std::cout << "[fused vs reference f32, N=8192 5 branches] causal=" << causal << " backward="
            << (backward.empty() ? "auto" : backward) << " out " << e_out << " lse " << e_lse
            << " dq " << e_dq << " dk " << e_dk << " dv " << e_dv << "\n";
  CAPTURE(e_out, e_lse, e_dq, e_dk, e_dv);
  REQUIRE(e_out <= kTolerance);
  REQUIRE(e_lse <= kTolerance);
  REQUIRE(e_dq <= kTolerance);
  REQUIRE(e_dk <= kTolerance);
  REQUIRE(e_dv <= kTolerance);
}

// The packed path (dilated_attention_packed): the fused backend reads the slots of one (B, N, (H + 2·Hkv)·D)
// projection, rotates only q and k, and writes the packed gradient from its accumulators (rotated back) in one pass.
// Against split_qkv and the float64 oracle on the CPU, for each position encoding and each engine.
TEST_CASE("fused backend on a packed projection matches split_qkv and the float64 oracle, forward and the packed "
          "gradient",
          "[attention][cuda]") {
  require_gpu();
  const std::string backend = GENERATE(as<std::string>{}, "fused", "fused-flash", "fused-portable");
  const ScopedEnv forward("LONGNET_FUSED_FORWARD", backend == "fused-portable" ? "portable" : "");
  const ScopedEnv backward("LONGNET_FUSED_BACKWARD", backend == "fused-flash" ? "flash" : "");
  const int position = GENERATE(0, 1, 2);  // none, rope, xpos
  std::vector<Case> cases;
  cases.push_back({.batch = 2, .n = 300, .heads = 4, .kv_heads = 4, .segments = {64, 128}, .rates = {1, 2},
                   .causal = true, .padding = Padding::right});
  cases.push_back({.batch = 2, .n = 256, .heads = 8, .kv_heads = 2, .segments = {96, 32}, .rates = {3, 1}});
  cases.push_back({.n = 1100, .heads = 3, .kv_heads = 3, .head_dim = 128, .segments = {1024, 512}, .rates = {1, 2},
                   .causal = true, .padding = Padding::left});
  cases.push_back({.n = 700, .heads = 6, .kv_heads = 6, .segments = {196, 1568}, .rates = {1, 2},
                   .dtype = at::kHalf});
  cases.push_back({.batch = 2, .n = 256, .heads = 4, .kv_heads = 4, .segments = {64, 128}, .rates = {1, 2},
                   .mix = Mix::head_split});
  const Case c = GENERATE_COPY(from_range(cases));
  CAPTURE(c, backend, position);

  torch::manual_seed(static_cast<uint64_t>(31 * position + c.n));
  const int64_t H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  const auto dev = torch::Device(torch::kCUDA);
  const auto opts = torch::TensorOptions().device(dev).dtype(c.dtype);
  const auto x = torch::randn({c.batch, c.n, (H + 2 * Hkv) * D}, opts).requires_grad_();
  const auto dout = torch::randn({c.batch, c.n, H, D}, opts);
  const auto positions = torch::arange(c.n, torch::kLong);
  longnet::attention::QkvRotation rotation;  // float64 on the CPU: the oracle's; the backend converts its copy
  if (position > 0) std::tie(rotation.cos, rotation.sin) = longnet::attention::rotary_cos_sin(positions, D, 1e4);
  if (position == 2) {
    rotation.q_scale = longnet::attention::xpos_scale(positions - c.n / 2, D, 512.0);
    rotation.k_scale = longnet::attention::xpos_scale(c.n / 2 - positions, D, 512.0);
  }
  const DilatedAttentionConfig config = config_of(c);
  AttentionOptions options;
  if (c.padding != Padding::none) options.key_padding_mask = padding_mask(c).to(dev);

  const auto fused = longnet::attention::fused_dilated_attention_packed(x, H, Hkv, rotation, config, options);
  REQUIRE(fused.out.sizes() == at::IntArrayRef{c.batch, c.n, H, D});
  REQUIRE(fused.out.scalar_type() == c.dtype);
  fused.out.backward(dout);
  REQUIRE(x.grad().sizes() == x.sizes());

  AttentionOptions cpu_options;
  if (options.key_padding_mask) cpu_options.key_padding_mask = options.key_padding_mask->cpu();
  const auto x64 = x.detach().cpu().to(at::kDouble).requires_grad_();
  const auto split = longnet::attention::split_qkv(x64, H, Hkv, rotation.cos, rotation.sin, rotation.q_scale,
                                                   rotation.k_scale);
  const auto oracle = oracle_dilated_attention(split.q, split.k, split.v, config, cpu_options);
  oracle.out.backward(dout.cpu().to(at::kDouble));

  const double e_out = relative_error(fused.out, oracle.out), e_lse = relative_error(fused.lse, oracle.lse);
  const double e_grad = relative_error(x.grad(), x64.grad());
  std::cout << "[packed " << backend << " vs oracle] " << c << " position=" << position << " out " << e_out
            << " lse " << e_lse << " dqkv " << e_grad << "\n";
  CAPTURE(e_out, e_lse, e_grad);
  REQUIRE(e_out <= kTolerance);
  REQUIRE(e_lse <= kTolerance);
  REQUIRE(e_grad <= kTolerance);

  // The dispatcher takes this path where `auto` resolves to the fused backend (its forward is deterministic).
  const auto q_view = x.detach().narrow(2, 0, H * D).view({c.batch, c.n, H, D});
  if (longnet::attention::fused_backend_preferred(q_view, options)) {
    torch::NoGradGuard no_grad;
    const auto dispatched = longnet::attention::dilated_attention_packed(x, H, Hkv, rotation, config, options);
    REQUIRE(torch::equal(dispatched.out, fused.out));
  }
}
