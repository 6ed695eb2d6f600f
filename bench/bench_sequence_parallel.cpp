// `bench_sequence_parallel`: LongNet sequence parallelism (distributed/sequence_parallel.h) on 1, 2 or 4 GPUs of one
// host, one rank per GPU over NCCL; the program spawns its ranks itself (distributed/launch.h).
//
// Configuration (the LongNet paper's): H = 12 heads, D = 64, bf16, batch 1, segment lengths 2048·4^i below N plus N
// itself, dilation rates w/2048 (1, 4, 16, 64, ...): the largest segment spans every rank.
//
// Reports, as a table and as JSON (card, torch and CUDA versions, git commit):
//   * per N: time per forward and per forward+backward (slowest rank), bytes each rank sent in the forward and in
//     forward+backward (counted by the collectives' callers);
//   * weak scaling at --tokens-per-gpu tokens per GPU (N = P·T): time per token and the efficiency t(P=1, N=T) /
//     t(P, N=P·T), where the P=1 time is measured on every GPU alone at the same moment;
//   * the longest N whose forward+backward fits: doubling from P·256K, then bisecting in 256K steps (CUDA OOM caught;
//     the ranks agree on the outcome after each try; parts are equal when N is a multiple of P, so the ranks run out
//     of memory alike, and a rank that fails inside a collective would leave the others to NCCL's timeout).
//
//   bench_sequence_parallel --gpus 4 --tokens-per-gpu 1048576 --json results/sp_h100x4.json
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <torch/version.h>

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

#include "attention/dilated_attention.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "distributed/launch.h"
#include "distributed/process_group.h"
#include "distributed/sequence_parallel.h"

namespace {

using json = nlohmann::json;
using longnet::distributed::CommStats;
using longnet::distributed::ProcessGroup;

struct Options {
  int gpus = 0;  // 0: every visible GPU
  int64_t tokens_per_gpu = 1 << 20;
  std::vector<int64_t> lengths;  // default: P·{256K, 512K, 1M, 2M}
  int64_t max_search_limit = int64_t{1} << 30;
  bool max_search = true;
  int warmup = 2;
  int iterations = 5;
  std::string json_path = "bench_sequence_parallel.json";
  std::string commit;
};

constexpr int64_t kHeads = 12, kHeadDim = 64, kBaseSegment = 2048, kSearchStep = 256 * 1024;

longnet::attention::DilatedAttentionConfig longnet_config(int64_t n) {
  longnet::attention::DilatedAttentionConfig config;
  for (int64_t w = kBaseSegment; w < n; w *= 4) {
    config.segment_lengths.push_back(w);
    config.dilation_rates.push_back(w / kBaseSegment);
  }
  config.segment_lengths.push_back(n);
  config.dilation_rates.push_back(std::max<int64_t>(1, n / kBaseSegment));
  config.causal = true;
  config.backend = longnet::attention::Backend::automatic;  // fused on Hopper (D = 64), else flash
  return config;
}

std::string git_commit(const std::string& option) {
  if (!option.empty()) return option;
  if (const char* from_env = std::getenv("LONGNET_GIT_COMMIT")) return from_env;
  std::string commit;
  if (FILE* pipe = ::popen("git rev-parse HEAD 2>/dev/null", "r")) {
    char buffer[128];
    while (std::fgets(buffer, sizeof(buffer), pipe) != nullptr) commit += buffer;
    ::pclose(pipe);
  }
  while (!commit.empty() && (commit.back() == '\n' || commit.back() == '\r')) commit.pop_back();
  return commit.empty() ? "unknown" : commit;
}

#ifdef LONGNET_WITH_CUDA

struct Measurement {
  bool ok = false;
  double forward_ms = 0, forward_backward_ms = 0;
  CommStats forward_bytes, forward_backward_bytes;
};

class Rank {
 public:
  Rank(ProcessGroup group, const Options& options) : group_(std::move(group)), options_(options) {}

  // The slowest rank's value (every rank gets it).
  double max_over_ranks(double value) const {
    auto local = torch::tensor({value}, torch::dtype(torch::kDouble).device(torch::kCUDA));
    auto all = torch::empty({group_.size()}, local.options());
    group_.all_gather(all, local);
    return all.max().item<double>();
  }
  bool all_ranks(bool value) const { return max_over_ranks(value ? 0.0 : 1.0) == 0.0; }

  // Forward and forward+backward at global length n on `group` (every rank holds its part); `single`: this rank
  // alone (a group of one) on n tokens.
  Measurement measure(int64_t n, bool single) {
    Measurement m;
    const ProcessGroup group = single ? ProcessGroup() : group_;
    const auto part = longnet::distributed::sequence_part(n, group.size(), group.rank());
    const auto config = longnet_config(n);
    bool ok = true;
    try {
      const auto opts = torch::dtype(torch::kBFloat16).device(torch::kCUDA);
      auto q = torch::randn({1, part.length, kHeads, kHeadDim}, opts).requires_grad_();
      auto k = torch::randn({1, part.length, kHeads, kHeadDim}, opts).requires_grad_();
      auto v = torch::randn({1, part.length, kHeads, kHeadDim}, opts).requires_grad_();
      auto run = [&](bool backward, CommStats* stats) {
        if (backward) {
          auto result = longnet::distributed::sequence_parallel_dilated_attention(q, k, v, config, {}, group, n, stats);
          result.out.backward(torch::ones_like(result.out));
        } else {
          torch::NoGradGuard no_grad;
          longnet::distributed::sequence_parallel_dilated_attention(q, k, v, config, {}, group, n, stats);
        }
      };
      run(false, &m.forward_bytes);
      run(true, &m.forward_backward_bytes);
      for (const bool backward : {false, true}) {
        for (int i = 0; i < options_.warmup; ++i) run(backward, nullptr);
        torch::cuda::synchronize();
        group.barrier();
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < options_.iterations; ++i) run(backward, nullptr);
        torch::cuda::synchronize();
        const double ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() /
            options_.iterations;
        (backward ? m.forward_backward_ms : m.forward_ms) = ms;
      }
    } catch (const c10::OutOfMemoryError&) {
      ok = false;
    }
    c10::cuda::CUDACachingAllocator::emptyCache();
    m.ok = all_ranks(ok);
    m.forward_ms = max_over_ranks(m.forward_ms);
    m.forward_backward_ms = max_over_ranks(m.forward_backward_ms);
    return m;
  }

  // One forward+backward at n: whether it fits on every rank.
  bool fits(int64_t n) {
    bool ok = true;
    try {
      const auto part = longnet::distributed::sequence_part(n, group_.size(), group_.rank());
      const auto opts = torch::dtype(torch::kBFloat16).device(torch::kCUDA);
      auto q = torch::randn({1, part.length, kHeads, kHeadDim}, opts).requires_grad_();
      auto k = torch::randn_like(q).requires_grad_(), v = torch::randn_like(q).requires_grad_();
      auto result =
          longnet::distributed::sequence_parallel_dilated_attention(q, k, v, longnet_config(n), {}, group_, n);
      result.out.backward(torch::ones_like(result.out));
      torch::cuda::synchronize();
    } catch (const c10::OutOfMemoryError&) {
      ok = false;
    }
    c10::cuda::CUDACachingAllocator::emptyCache();
    return all_ranks(ok);
  }

  // Exactness on the GPU: every rank draws the same full q, k, v and upstream gradient, runs its part through the
  // sequence-parallel function and compares its rows of the output and of dq, dk, dv with the single-device
  // dilated attention on the whole sequence. Returns the largest relative error (max |a - b| / max |b|) over ranks.
  double check(int64_t n) {
    const auto part = longnet::distributed::sequence_part(n, group_.size(), group_.rank());
    const auto config = longnet_config(n);
    torch::manual_seed(1234);  // the same tensors on every rank
    const auto opts = torch::dtype(torch::kBFloat16).device(torch::kCUDA);
    const auto q = torch::randn({1, n, kHeads, kHeadDim}, opts), k = torch::randn_like(q), v = torch::randn_like(q);
    const auto dout = torch::randn_like(q);
    auto mine = [&](const at::Tensor& t) { return t.narrow(1, part.start, part.length).detach().clone().requires_grad_(); };
    auto lq = mine(q), lk = mine(k), lv = mine(v);
    auto sp = longnet::distributed::sequence_parallel_dilated_attention(lq, lk, lv, config, {}, group_, n);
    sp.out.backward(dout.narrow(1, part.start, part.length));
    auto fq = q.clone().requires_grad_(), fk = k.clone().requires_grad_(), fv = v.clone().requires_grad_();
    auto full = longnet::attention::dilated_attention(fq, fk, fv, config);
    full.out.backward(dout);
    auto rel = [&](const at::Tensor& a, const at::Tensor& b) {
      const auto bf = b.narrow(1, part.start, part.length).to(torch::kFloat);
      return ((a.to(torch::kFloat) - bf).abs().max() / bf.abs().max().clamp_min(1e-30)).item<double>();
    };
    const double local = std::max({rel(sp.out, full.out), rel(lq.grad(), fq.grad()), rel(lk.grad(), fk.grad()),
                                   rel(lv.grad(), fv.grad())});
    c10::cuda::CUDACachingAllocator::emptyCache();
    return max_over_ranks(local);
  }

  int64_t max_length() {
    const int64_t P = group_.size();
    int64_t good = 0, bad = 0;
    for (int64_t n = P * kSearchStep; n <= options_.max_search_limit; n *= 2) {
      if (!fits(n)) {
        bad = n;
        break;
      }
      good = n;
    }
    if (bad == 0) return good;  // the limit fits
    while (bad - good > kSearchStep) {
      const int64_t mid = good + (bad - good) / 2 / kSearchStep * kSearchStep;
      if (mid <= good) break;
      (fits(mid) ? good : bad) = mid;
    }
    return good;
  }

 private:
  ProcessGroup group_;
  const Options& options_;
};

std::string mib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return text;
}

int run_rank(const Options& options, const longnet::distributed::LaunchEnv& env) {
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(env.local_rank));
  const auto group = longnet::distributed::make_group(longnet::distributed::connect_store(env), "bench", env.rank,
                                                      env.world_size, c10::DeviceType::CUDA);
  Rank rank(group, options);
  const int64_t P = env.world_size;
  const bool lead = env.rank == 0;
  std::vector<int64_t> lengths = options.lengths;
  if (lengths.empty()) {
    for (int64_t per_gpu : {256 * 1024, 512 * 1024, 1024 * 1024, 2048 * 1024}) lengths.push_back(P * per_gpu);
  }
  json report;
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  report["card"] = at::cuda::getCurrentDeviceProperties()->name;
  report["torch"] = TORCH_VERSION;
  report["cuda"] = std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
  report["commit"] = git_commit(options.commit);
  report["gpus"] = P;
  report["config"] = {{"heads", kHeads}, {"head_dim", kHeadDim}, {"dtype", "bf16"}, {"batch", 1}, {"causal", true},
                      {"segments", "2048·4^i below N, and N"}, {"dilation", "w / 2048"},
                      {"warmup", options.warmup}, {"iterations", options.iterations}};
  if (lead) {
    std::printf("sequence parallel dilated attention, %lld x %s, H=%lld D=%lld bf16 causal\n",
                static_cast<long long>(P), report["card"].get<std::string>().c_str(),
                static_cast<long long>(kHeads), static_cast<long long>(kHeadDim));
    std::printf("%12s %12s %14s %16s %18s\n", "N", "fwd ms", "fwd+bwd ms", "fwd MiB/rank", "fwd+bwd MiB/rank");
  }
  // Exact before fast: the sequence-parallel result against single-device attention on the whole sequence.
  const int64_t check_n = P * 256 * 1024;
  const double check_error = rank.check(check_n);
  report["check"] = {{"n", check_n}, {"max_relative_error", check_error}, {"against", "single-device flash backend"}};
  if (lead) {
    std::printf("check N=%lld: sequence parallel vs single device, out/dq/dk/dv max relative error %.3g\n",
                static_cast<long long>(check_n), check_error);
  }
  json rows = json::array();
  for (const int64_t n : lengths) {
    const Measurement m = rank.measure(n, /*single=*/false);
    rows.push_back({{"n", n}, {"status", m.ok ? "ok" : "out of memory"}, {"forward_ms", m.forward_ms},
                    {"forward_backward_ms", m.forward_backward_ms},
                    {"forward_bytes_sent_per_rank", m.forward_bytes.bytes_sent},
                    {"forward_backward_bytes_sent_per_rank", m.forward_backward_bytes.bytes_sent},
                    {"forward_backward_bytes_received_per_rank", m.forward_backward_bytes.bytes_received}});
    if (lead) {
      if (m.ok) {
        std::printf("%12lld %12.2f %14.2f %16s %18s\n", static_cast<long long>(n), m.forward_ms, m.forward_backward_ms,
                    mib(m.forward_bytes.bytes_sent).c_str(), mib(m.forward_backward_bytes.bytes_sent).c_str());
      } else {
        std::printf("%12lld %12s\n", static_cast<long long>(n), "out of memory");
      }
      std::fflush(stdout);
    }
  }
  report["lengths"] = rows;

  const int64_t T = options.tokens_per_gpu;
  const Measurement alone = rank.measure(T, /*single=*/true);
  const Measurement together = rank.measure(P * T, /*single=*/false);
  json weak = {{"tokens_per_gpu", T}, {"n", P * T}};
  if (alone.ok && together.ok) {
    weak["single_gpu_forward_backward_ms"] = alone.forward_backward_ms;
    weak["forward_backward_ms"] = together.forward_backward_ms;
    weak["ns_per_token"] = together.forward_backward_ms * 1e6 / static_cast<double>(P * T);
    weak["single_gpu_ns_per_token"] = alone.forward_backward_ms * 1e6 / static_cast<double>(T);
    weak["efficiency"] = alone.forward_backward_ms / together.forward_backward_ms;
    if (lead) {
      std::printf("weak scaling at %lld tokens/GPU: P=1 %.2f ms, P=%lld %.2f ms (N=%lld), %.3f ns/token, "
                  "efficiency %.3f\n",
                  static_cast<long long>(T), alone.forward_backward_ms, static_cast<long long>(P),
                  together.forward_backward_ms, static_cast<long long>(P * T), weak["ns_per_token"].get<double>(),
                  weak["efficiency"].get<double>());
    }
  } else {
    weak["status"] = "out of memory";
    if (lead) std::printf("weak scaling at %lld tokens/GPU: out of memory\n", static_cast<long long>(T));
  }
  report["weak_scaling"] = weak;

  if (options.max_search) {
    const int64_t longest = rank.max_length();
    report["max_length_forward_backward"] = longest;
    if (lead) std::printf("longest N with forward+backward: %lld\n", static_cast<long long>(longest));
  }
  if (lead) {
    longnet::write_file_atomic(options.json_path, report.dump(2) + "\n");
    std::printf("wrote %s\n", options.json_path.c_str());
  }
  group.barrier();
  // bf16 inputs, both sides float32-accumulated: a few units of 2^-8 (as the attention tests allow).
  return check_error <= 2e-2 ? 0 : 1;
}

#endif  // LONGNET_WITH_CUDA

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LongNet sequence parallelism on the GPUs of one host (one rank per GPU, NCCL)"};
  Options options;
  app.add_option("--gpus", options.gpus, "ranks, one per GPU (1, 2 or 4; 0 = every visible GPU)");
  app.add_option("--tokens-per-gpu", options.tokens_per_gpu, "weak scaling: tokens per GPU (N = P·T)");
  app.add_option("--lengths", options.lengths, "global sequence lengths to time (default P·{256K, 512K, 1M, 2M})");
  app.add_option("--max-search-limit", options.max_search_limit, "longest global N the length search tries");
  app.add_flag("!--no-max-search", options.max_search, "skip the longest-sequence search");
  app.add_option("--warmup", options.warmup, "untimed iterations before each timing");
  app.add_option("--iterations", options.iterations, "timed iterations per measurement");
  app.add_option("--json", options.json_path, "where rank 0 writes the results");
  app.add_option("--commit", options.commit, "git commit to record (default: LONGNET_GIT_COMMIT or git rev-parse)");
  CLI11_PARSE(app, argc, argv);
  try {
#ifndef LONGNET_WITH_CUDA
    std::cerr << "bench_sequence_parallel: this build has no CUDA support (configure with -DLONGNET_CUDA=ON)\n";
    return 1;
#else
    if (const auto env = longnet::distributed::launch_env_from_environment()) return run_rank(options, *env);
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      std::cerr << "bench_sequence_parallel: no CUDA device is visible; it needs 1, 2 or 4 GPUs of one host (one "
                   "rank per GPU)\n";
      return 1;
    }
    const int P = options.gpus == 0 ? devices : options.gpus;
    if (P < 1 || P > devices) {
      std::cerr << "bench_sequence_parallel: --gpus " << options.gpus << " but " << devices << " GPUs are visible\n";
      return 2;
    }
    // The ranks are fresh processes (this one has initialised CUDA, which must not cross a fork).
    longnet::distributed::SpawnOptions spawn;
    spawn.nproc = P;
    spawn.drop_arguments = {"--gpus"};
    return longnet::distributed::spawn_local_ranks(spawn, argc, argv);
#endif
  } catch (const std::exception& e) {
    std::cerr << "bench_sequence_parallel: " << longnet::format_error_chain(e) << "\n";
    return 1;
  }
}
