#include "bench/bench_attention.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <torch/version.h>

#include "attention/dilated_attention.h"
#include "attention/flash_backend.h"
#include "attention/fused_backend.h"
#include "core/atomic_file.h"
#include "core/error.h"

namespace longnet::bench {
namespace {

using attention::DilatedAttentionConfig;
using nlohmann::json;

struct BenchConfig {
  std::string name;
  int64_t heads, head_dim;
  DilatedAttentionConfig attention;
};

BenchConfig bench_config(const std::string& name) {
  DilatedAttentionConfig local5;
  local5.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  local5.dilation_rates = {1, 2, 4, 8, 16};
  if (name == "local5") return {name, 12, 64, local5};
  if (name == "wide") return {name, 16, 128, local5};
  if (name == "causal") {
    local5.causal = true;
    return {name, 12, 64, local5};
  }
  throw ConfigError("bench attention: unknown config '" + name + "' (expected local5, wide or causal)");
}

struct Stats {
  double median_ms, p10_ms, p90_ms;
};

// Nearest-rank percentile of sorted samples.
double percentile(const std::vector<double>& sorted, double p) {
  const auto rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

// CUDA events on the current stream around each repetition, after `warmup` untimed runs and then more untimed runs
// until `warmup_seconds` have passed since the first.
Stats time_ms(const std::function<void()>& fn, int warmup, double warmup_seconds, int repetitions) {
  const auto warmup_start = std::chrono::steady_clock::now();
  for (int i = 0; i < warmup; ++i) fn();
  torch::cuda::synchronize();
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - warmup_start).count() < warmup_seconds) {
    fn();
    torch::cuda::synchronize();
  }
  std::vector<double> samples;
  for (int i = 0; i < repetitions; ++i) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    const auto stream = at::cuda::getCurrentCUDAStream();
    start.record(stream);
    fn();
    stop.record(stream);
    stop.synchronize();
    samples.push_back(start.elapsed_time(stop));
  }
  std::sort(samples.begin(), samples.end());
  return {percentile(samples, 50), percentile(samples, 10), percentile(samples, 90)};
}

int device_index() { return at::cuda::current_device(); }

void reset_peak_memory() {
  c10::cuda::CUDACachingAllocator::emptyCache();
  c10::cuda::CUDACachingAllocator::resetPeakStats(device_index());
}

int64_t peak_memory_bytes() {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device_index());
  return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
}

// Torch-composed dilated attention, as public Python implementations write it: per branch and head offset one flash
// call on the sparsified rows, scattered into a dense per-branch output and LSE, then mixed by softmax weights of the
// stacked LSEs in float32. Autograd runs through it and treats each flash LSE as a constant (the flash op's LSE has
// no derivative), which makes its dq and dk ≈1 % wrong (FACTS.md); it is a speed baseline. Needs every row covered
// by some branch and N divisible by every w (as in the benchmark configurations).
// With mix = head_split each branch runs for its group of heads only and writes its rows straight into the output
// (no mixing: every head has one branch), so autograd through it is exact.
at::Tensor composed_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const DilatedAttentionConfig& config) {
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const auto K = static_cast<int64_t>(config.segment_lengths.size());
  const bool split = config.mix == attention::Mix::head_split;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<at::Tensor> outs, lses;
  at::Tensor split_out = split ? torch::zeros_like(q.detach()) : at::Tensor();
  for (int64_t i = 0; i < K; ++i) {
    const int64_t w = std::min(config.segment_lengths[i], N), r = config.dilation_rates[i], S = N / w;
    const int64_t lo = split ? i * H / K : 0, hi = split ? (i + 1) * H / K : H;
    auto out = split ? split_out : torch::zeros_like(q.detach());
    auto lse = split ? at::Tensor()
                     : torch::full({B, H, N}, -std::numeric_limits<double>::infinity(), q.options().dtype(torch::kFloat));
    for (int64_t o = 0; o < r; ++o) {
      const int64_t first = lo + ((o - lo) % r + r) % r;  // first head of [lo, hi) with offset o
      if (first >= hi) continue;
      auto gather = [&](const at::Tensor& x) {
        auto sparse = x.view({B, S, w, H, D}).slice(2, o, w, r).slice(3, first, hi, r);  // (B, S, L, Hs, D)
        return sparse.permute({0, 1, 3, 2, 4}).reshape({B * S, sparse.size(3), sparse.size(2), D});
      };
      auto res = at::_scaled_dot_product_flash_attention(gather(q), gather(k), gather(v), 0.0, config.causal, false,
                                                         scale);
      const auto& o_i = std::get<0>(res);  // (B·S, Hs, L, D)
      const auto& l_i = std::get<1>(res);  // (B·S, Hs, L)
      const int64_t Hs = o_i.size(1), L = o_i.size(2);
      out.view({B, S, w, H, D}).slice(2, o, w, r).slice(3, first, hi, r).copy_(
          o_i.view({B, S, Hs, L, D}).permute({0, 1, 3, 2, 4}));
      if (!split) {
        lse.view({B, H, S, w}).slice(1, first, hi, r).slice(3, o, w, r).copy_(
            l_i.view({B, S, Hs, L}).permute({0, 2, 1, 3}));
      }
    }
    if (!split) {
      outs.push_back(out);
      lses.push_back(lse);
    }
  }
  if (split) return split_out;
  const auto lse_all = torch::stack(lses);                     // (K, B, H, N)
  const auto weights = torch::exp(lse_all - torch::logsumexp(lse_all, 0, true));
  auto mixed = torch::zeros({B, N, H, D}, q.options().dtype(torch::kFloat));
  for (size_t i = 0; i < outs.size(); ++i) {
    mixed = mixed + weights[static_cast<int64_t>(i)].permute({0, 2, 1}).unsqueeze(-1) * outs[i].to(torch::kFloat);
  }
  return mixed.to(q.scalar_type());
}

// `ours`: the flash backend (cuDNN on strided views, combine kernel); `fused`: the fused kernels.
at::Tensor ours(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const DilatedAttentionConfig& config) {
  return attention::flash_dilated_attention(q, k, v, config, {}).out;
}

at::Tensor fused(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const DilatedAttentionConfig& config) {
  return attention::fused_dilated_attention(q, k, v, config, {}).out;
}

using Method = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const DilatedAttentionConfig&);

// Our backends, in the order they run at each length. The fused variants differ only in the engines the fused backend
// reads from LONGNET_FUSED_FORWARD and LONGNET_FUSED_BACKWARD (null: the device's choice), set while they run:
// `fused` the device's choices (on Hopper our TMA/wgmma kernels both ways), `fused_flash` the device's forward with
// the flash backend's backward (cuDNN per branch), `fused_portable` our mma.sync kernels both ways.
struct OwnMethod {
  const char* name;
  Method fn;
  bool fits;
  const char* fused_forward = nullptr;
  const char* fused_backward = nullptr;
};

// Sets a method's engine variables for a scope and clears them after (the benchmark runs with them unset).
class MethodEnv {
 public:
  explicit MethodEnv(const OwnMethod& m) {
    set("LONGNET_FUSED_FORWARD", m.fused_forward);
    set("LONGNET_FUSED_BACKWARD", m.fused_backward);
  }
  ~MethodEnv() {
    unsetenv("LONGNET_FUSED_FORWARD");
    unsetenv("LONGNET_FUSED_BACKWARD");
  }
  MethodEnv(const MethodEnv&) = delete;
  MethodEnv& operator=(const MethodEnv&) = delete;

 private:
  static void set(const char* name, const char* value) {
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
};

at::Tensor dense_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  return at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), {}, 0.0, causal)
      .transpose(1, 2);
}

std::string human_tokens(int64_t n) {
  if (n % (int64_t{1} << 20) == 0) return std::to_string(n >> 20) + "M";
  if (n % (int64_t{1} << 10) == 0) return std::to_string(n >> 10) + "K";
  return std::to_string(n);
}

struct Environment {
  std::string device, torch_version, cuda_version, cudnn_version, commit;
};

Environment environment(const std::string& commit_option) {
  Environment env;
  env.device = at::cuda::getCurrentDeviceProperties()->name;
  env.torch_version = TORCH_VERSION;
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  env.cuda_version = std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
  env.cudnn_version = std::to_string(at::detail::getCUDAHooks().versionCuDNN());
  env.commit = commit_option;
  if (env.commit.empty()) {
    const char* from_env = std::getenv("LONGNET_GIT_COMMIT");
    env.commit = from_env != nullptr ? from_env : "unknown";
  }
  return env;
}

class Runner {
 public:
  Runner(const AttentionBenchOptions& options, BenchConfig config)
      : options_(options), config_(std::move(config)), env_(environment(options.git_commit)) {}

  // Times one method in one mode at length n; records it. Returns false when it ran out of memory or failed.
  bool measure(const std::string& method, const std::string& mode, int64_t n, double flops,
               const std::function<void()>& fn, const json& check = json::object()) {
    json record = base_record(method, mode, n);
    record["check"] = check;
    try {
      reset_peak_memory();
      const Stats s = time_ms(fn, options_.warmup, options_.warmup_seconds, options_.repetitions);
      record["status"] = "ok";
      record["stats"] = {{"median_ms", s.median_ms}, {"p10_ms", s.p10_ms}, {"p90_ms", s.p90_ms},
                         {"repetitions", options_.repetitions}, {"warmup", options_.warmup},
                         {"warmup_seconds", options_.warmup_seconds}};
      record["tflops"] = flops / (s.median_ms * 1e-3) / 1e12;
      record["tokens_per_s"] = static_cast<double>(n) / (s.median_ms * 1e-3);
      record["peak_memory_bytes"] = peak_memory_bytes();
      std::printf("%-10s %-9s %6s %10.2f %9.2f %9.2f %8.1f %12.3g %8.2f\n", method.c_str(), mode.c_str(),
                  human_tokens(n).c_str(), s.median_ms, s.p10_ms, s.p90_ms, record["tflops"].get<double>(),
                  record["tokens_per_s"].get<double>(),
                  static_cast<double>(record["peak_memory_bytes"].get<int64_t>()) / (1 << 30));
    } catch (const c10::OutOfMemoryError&) {
      record["status"] = "oom";
      std::printf("%-10s %-9s %6s  out of memory\n", method.c_str(), mode.c_str(), human_tokens(n).c_str());
    } catch (const std::exception& e) {
      record["status"] = "error";
      record["message"] = std::string(e.what()).substr(0, 500);
      std::printf("%-10s %-9s %6s  error: %s\n", method.c_str(), mode.c_str(), human_tokens(n).c_str(),
                  record["message"].get<std::string>().substr(0, 160).c_str());
    }
    std::fflush(stdout);
    records_.push_back(record);
    // Written after every record, so that a run cut short (time limit, crash) still leaves its results.
    if (!options_.output_json.empty()) write_file_atomic(options_.output_json, records_.dump(2) + "\n");
    c10::cuda::CUDACachingAllocator::emptyCache();
    return record["status"] == "ok";
  }

  json base_record(const std::string& method, const std::string& mode, int64_t n) const {
    const auto& a = config_.attention;
    return {{"benchmark", "attention"},
            {"config", config_.name},
            {"method", method},
            {"mode", mode},
            {"params",
             {{"B", 1},
              {"N", n},
              {"H", config_.heads},
              {"D", config_.head_dim},
              {"segment_lengths", a.segment_lengths},
              {"dilation_rates", a.dilation_rates},
              {"causal", a.causal},
              {"mix", attention::to_string(a.mix)}}},
            {"dtype", "bfloat16"},
            {"engine", std::getenv("LONGNET_FLASH_ENGINE") != nullptr ? std::getenv("LONGNET_FLASH_ENGINE") : "auto"},
            {"device", env_.device},
            {"torch", env_.torch_version},
            {"cuda", env_.cuda_version},
            {"cudnn", env_.cudnn_version},
            {"commit", env_.commit}};
  }

  json& records() { return records_; }

 private:
  const AttentionBenchOptions& options_;
  BenchConfig config_;
  Environment env_;
  json records_ = json::array();
};

struct Errors {
  double max_abs, relative;  // max |a - b| and max |a - b| / max |b|
};

Errors compare(const at::Tensor& actual, const at::Tensor& expected) {
  const auto a = actual.to(torch::kFloat), e = expected.to(torch::kFloat);
  const double max_abs = (a - e).abs().max().item<double>();
  return {max_abs, max_abs / std::max(e.abs().max().item<double>(), 1e-30)};
}

}  // namespace

void add_attention_bench_options(CLI::App& app, AttentionBenchOptions& options) {
  app.add_option("--config", options.config, "local5, wide or causal (BENCHMARKS.md)")->capture_default_str();
  app.add_option("--lengths", options.lengths, "Training sequence lengths (default: 32K doubling up to --max-length)");
  app.add_option("--max-length", options.max_length, "Largest default training length")->capture_default_str();
  app.add_option("--dense-max-length", options.dense_max_length, "Dense SDPA runs up to this length")
      ->capture_default_str();
  app.add_option("--inference-lengths", options.inference_lengths, "Lengths of the no-grad forward runs")
      ->capture_default_str();
  app.add_flag("!--no-inference", options.inference, "Skip the no-grad forward runs");
  app.add_option("--mode", options.mode, "fwd, fwdbwd or both")->capture_default_str();
  app.add_option("--mix", options.mix, "lse or head_split (attention.mix)")->capture_default_str();
  app.add_option("--methods", options.methods,
                 "Methods to run: fused, fused_flash (with the flash backend's backward), fused_portable (our mma.sync "
                 "kernels both ways), ours (the flash backend), composed, dense_sdpa")
      ->capture_default_str();
  app.add_option("--repetitions", options.repetitions, "Timed repetitions per measurement")->capture_default_str();
  app.add_option("--warmup", options.warmup, "Untimed runs before timing")->capture_default_str();
  app.add_option("--warmup-seconds", options.warmup_seconds,
                 "Then keep running untimed until this many seconds have passed (the card's sustained clocks)")
      ->capture_default_str();
  app.add_option("--json", options.output_json, "Write the records to this JSON file");
  app.add_option("--commit", options.git_commit, "Git commit recorded in the JSON (default: $LONGNET_GIT_COMMIT)");
}

int run_attention_benchmark(const AttentionBenchOptions& options) {
  if (!torch::cuda::is_available()) throw Error("bench attention: no CUDA device is visible");
  if (options.repetitions < 1 || options.warmup < 0 || !(options.warmup_seconds >= 0)) {
    throw ConfigError("bench attention: repetitions must be >= 1, warmup >= 0 and warmup-seconds >= 0");
  }
  if (options.mode != "fwd" && options.mode != "fwdbwd" && options.mode != "both") {
    throw ConfigError("bench attention: mode must be fwd, fwdbwd or both, got '" + options.mode + "'");
  }
  BenchConfig config = bench_config(options.config);
  config.attention.mix = attention::parse_mix(options.mix);
  const auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  {
    std::string why;
    if (!attention::flash_backend_supports(torch::empty({1, 1, config.heads, config.head_dim}, opts), {}, &why)) {
      throw Error("bench attention: the flash backend cannot run here: " + why);
    }
  }
  auto wanted = [&](const std::string& method) {
    return std::find(options.methods.begin(), options.methods.end(), method) != options.methods.end();
  };
  for (const auto& m : options.methods) {
    if (m != "fused" && m != "fused_flash" && m != "fused_portable" && m != "ours" && m != "composed" &&
        m != "dense_sdpa") {
      throw ConfigError("bench attention: unknown method '" + m +
                        "' (expected fused, fused_flash, fused_portable, ours, composed or dense_sdpa)");
    }
  }
  if (wanted("fused") || wanted("fused_flash") || wanted("fused_portable")) {
    std::string why;
    if (!attention::fused_backend_supports(torch::empty({1, 1, config.heads, config.head_dim}, opts), {}, &why)) {
      throw Error("bench attention: the fused backend cannot run here: " + why);
    }
  }
  Runner runner(options, config);
  const auto& cfg = config.attention;
  const int64_t H = config.heads, D = config.head_dim;
  const bool fwd = options.mode != "fwdbwd", fwdbwd = options.mode != "fwd";
  int failed_checks = 0;

  std::vector<int64_t> lengths = options.lengths;
  if (lengths.empty()) {
    for (int64_t n = int64_t{1} << 15; n <= options.max_length; n *= 2) lengths.push_back(n);
  }
  std::printf("attention benchmark '%s' (mix %s) on %s: B=1 H=%lld D=%lld bf16, %d repetitions after %d warm-up\n",
              config.name.c_str(), options.mix.c_str(), at::cuda::getCurrentDeviceProperties()->name,
              static_cast<long long>(H),
              static_cast<long long>(D), options.repetitions, options.warmup);
  std::printf("%-10s %-9s %6s %10s %9s %9s %8s %12s %8s\n", "method", "mode", "N", "median_ms", "p10_ms", "p90_ms",
              "TFLOP/s", "tokens/s", "peak_GB");

  std::vector<OwnMethod> own;
  for (const OwnMethod m : {OwnMethod{"fused", fused, true}, OwnMethod{"fused_flash", fused, true, nullptr, "flash"},
                            OwnMethod{"fused_portable", fused, true, "portable", "kernel"},
                            OwnMethod{"ours", ours, true}}) {
    if (wanted(m.name)) own.push_back(m);
  }
  for (OwnMethod& method : own) {
    if (!options.inference) break;
    // Forward only, no autograd state: how long a sequence one card holds.
    torch::NoGradGuard no_grad;
    const MethodEnv env(method);
    for (const int64_t n : options.inference_lengths) {
      at::Tensor q, k, v;
      try {
        q = torch::randn({1, n, H, D}, opts);
        k = torch::randn({1, n, H, D}, opts);
        v = torch::randn({1, n, H, D}, opts);
      } catch (const c10::OutOfMemoryError&) {
        std::printf("inputs for N=%s do not fit; stopping\n", human_tokens(n).c_str());
        break;
      }
      if (!runner.measure(method.name, "inference", n, cfg.forward_flops(1, n, H, D),
                          [&] { method.fn(q, k, v, cfg); })) {
        break;
      }
    }
  }

  bool composed_fits = wanted("composed"), dense_fits = wanted("dense_sdpa");
  for (const int64_t n : lengths) {
    const bool any_own = std::any_of(own.begin(), own.end(), [](const OwnMethod& m) { return m.fits; });
    if (!any_own && !composed_fits) break;
    const double flops = cfg.forward_flops(1, n, H, D);
    const double dense_flops = 4.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(H * D) *
                               (cfg.causal ? 0.5 : 1.0);
    torch::manual_seed(static_cast<uint64_t>(n));
    at::Tensor q, k, v, dout;
    try {
      q = torch::randn({1, n, H, D}, opts).requires_grad_();
      k = torch::randn({1, n, H, D}, opts).requires_grad_();
      v = torch::randn({1, n, H, D}, opts).requires_grad_();
      dout = torch::randn({1, n, H, D}, opts);
    } catch (const c10::OutOfMemoryError&) {
      std::printf("inputs for N=%s do not fit; stopping\n", human_tokens(n).c_str());
      break;
    }
    auto clear_grads = [&] {
      for (auto* t : {&q, &k, &v}) t->mutable_grad().reset();
    };

    // Correctness before timing: each of our forwards against the composed one (exact in the forward pass).
    for (OwnMethod& method : own) {
      const MethodEnv env(method);
      json check = json::object();
      if (composed_fits && method.fits) {
        try {
          torch::NoGradGuard no_grad;
          const Errors e = compare(method.fn(q, k, v, cfg), composed_dilated_attention(q, k, v, cfg));
          check = {{"against", "composed"}, {"max_abs_error", e.max_abs}, {"relative_error", e.relative}};
          std::printf("check N=%s: %s vs composed forward: max abs error %.3g, relative %.3g\n",
                      human_tokens(n).c_str(), method.name, e.max_abs, e.relative);
          if (!(e.relative <= 2e-2)) ++failed_checks;
        } catch (const c10::OutOfMemoryError&) {
          check = {{"against", "composed"}, {"status", "oom"}};
        }
        c10::cuda::CUDACachingAllocator::emptyCache();
      }
      if (method.fits && fwd) {
        torch::NoGradGuard no_grad;
        method.fits = runner.measure(method.name, "fwd", n, flops, [&] { method.fn(q, k, v, cfg); }, check);
      }
      if (method.fits && fwdbwd) {
        method.fits = runner.measure(method.name, "fwdbwd", n, 3.5 * flops, [&] {
          clear_grads();
          method.fn(q, k, v, cfg).backward(dout);
        }, check);
      }
    }
    if (composed_fits && fwd) {
      torch::NoGradGuard no_grad;
      composed_fits = runner.measure("composed", "fwd", n, flops, [&] { composed_dilated_attention(q, k, v, cfg); });
    }
    if (composed_fits && fwdbwd) {
      composed_fits = runner.measure("composed", "fwdbwd", n, 3.5 * flops, [&] {
        clear_grads();
        composed_dilated_attention(q, k, v, cfg).backward(dout);
      });
    }
    if (dense_fits && n <= options.dense_max_length) {
      if (fwd) {
        torch::NoGradGuard no_grad;
        dense_fits = runner.measure("dense_sdpa", "fwd", n, dense_flops, [&] { dense_sdpa(q, k, v, cfg.causal); });
      }
      if (dense_fits && fwdbwd) {
        dense_fits = runner.measure("dense_sdpa", "fwdbwd", n, 3.5 * dense_flops, [&] {
          clear_grads();
          dense_sdpa(q, k, v, cfg.causal).backward(dout);
        });
      }
    }
    clear_grads();
  }

  if (!options.output_json.empty()) {
    std::printf("wrote %zu records to %s\n", runner.records().size(), options.output_json.c_str());
  }
  if (failed_checks > 0) {
    std::printf("%d correctness check(s) failed\n", failed_checks);
    return 1;
  }
  return 0;
}

}  // namespace longnet::bench
