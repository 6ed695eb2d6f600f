// `bench_fusion`: forward + backward of a ~100M-parameter multimodal LongNet (text, image, video and audio stacks of
// width 768, concat_seq fusion) with the per-modality stacks run one after another vs on separate CUDA streams
// (fusion.parallel_stacks). Prints a table and, with --json PATH, writes the records there. Needs a CUDA device.
//
//   bench_fusion --batch 4 --iters 10 --json results/fusion_h100.json
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <numeric>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "bench/bench_main.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "fusion/multimodal_model.h"

#ifdef LONGNET_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace {

using namespace longnet;
using modalities::Modality;
using nlohmann::json;

struct Options {
  int64_t batch = 4;
  int64_t warmup = 3;
  int64_t iters = 10;
  std::string dtype = "bf16";
  std::string strategy = "concat_seq";
  std::string json_path;
};

// Tokens per sample: text 1024, image 256 (16 × 16 patches), video 1024 (4 × 16 × 16 tubelets), audio 512.
constexpr std::array<int64_t, 4> kLengths{1024, 256, 1024, 512};

struct Setup {
  fusion::ModelConfig model{.width = 768, .depth = 1, .heads = 12, .kv_heads = 12, .mlp = fusion::MlpKind::gelu,
                            .mlp_ratio = 4.0};
  fusion::AttentionConfig attention{.dilated = {.segment_lengths = {256}, .dilation_rates = {1}}};
  fusion::MultimodalConfig config;

  explicit Setup(const std::string& strategy) {
    config.fusion.strategy = strategy;
    config.fusion.depth = 1;
    config.fusion.segment_lengths = {512, 2048};
    config.fusion.dilation_rates = {1, 4};
    config.fusion.embed_dim = 512;
    auto set = [this](Modality m, int64_t depth, std::vector<int64_t> w, std::vector<int64_t> r, int64_t input_dim,
                      int64_t max_positions) {
      auto& c = config[m];
      c.enabled = true;
      c.depth = depth;
      c.segment_lengths = std::move(w);
      c.dilation_rates = std::move(r);
      c.input_dim = input_dim;
      c.max_positions = max_positions;
    };
    set(Modality::text, 4, {256, 1024}, {1, 4}, 8000, 1024);
    set(Modality::image, 3, {256}, {1}, 768, 16);
    set(Modality::video, 3, {256, 1024}, {1, 4}, 1536, 16);
    set(Modality::audio, 2, {256, 512}, {1, 2}, 256, 512);
  }
};

fusion::MultimodalInput make_input(int64_t b, const torch::TensorOptions& f) {
  const auto dev = f.device();
  const auto i64 = torch::TensorOptions().dtype(torch::kLong).device(dev);
  fusion::MultimodalInput in;
  in.modalities[0] = fusion::ModalityInput{.data = torch::randint(0, 8000, {b, kLengths[0]}, i64)};
  auto grid = [&](int64_t t, int64_t y, int64_t x) {
    const auto tt = torch::arange(t, i64).view({t, 1, 1}).expand({t, y, x});
    const auto yy = torch::arange(y, i64).view({1, y, 1}).expand({t, y, x});
    const auto xx = torch::arange(x, i64).view({1, 1, x}).expand({t, y, x});
    return torch::stack({tt, yy, xx}, -1).reshape({1, -1, 3}).expand({b, -1, 3}).contiguous();
  };
  in.modalities[1] = fusion::ModalityInput{.data = torch::randn({b, kLengths[1], 768}, f), .positions = grid(1, 16, 16)};
  in.modalities[2] = fusion::ModalityInput{.data = torch::randn({b, kLengths[2], 1536}, f), .positions = grid(4, 16, 16)};
  in.modalities[3] = fusion::ModalityInput{.data = torch::randn({b, kLengths[3], 256}, f), .positions = grid(512, 1, 1)};
  in.present = torch::ones({b, 4}, i64.dtype(torch::kBool));
  return in;
}

json measure(bool parallel, const Options& o, torch::Dtype dtype) {
  Setup setup(o.strategy);
  setup.config.fusion.parallel_stacks = parallel;
  torch::manual_seed(0);
  fusion::MultimodalModel model(setup.model, setup.attention, setup.config);
  model->to(torch::kCUDA, dtype);
  const auto in = make_input(o.batch, torch::TensorOptions().dtype(dtype).device(torch::kCUDA));
  auto step = [&] {
    model->zero_grad();
    const auto out = model(in);
    const auto loss = out.joint.to(torch::kFloat).square().mean() + out.lm_logits.to(torch::kFloat).logsumexp(-1).mean();
    loss.backward();
  };
#ifdef LONGNET_WITH_CUDA
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
#endif
  for (int64_t i = 0; i < o.warmup; ++i) step();
  torch::cuda::synchronize();
  std::vector<double> ms;
  for (int64_t i = 0; i < o.iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    torch::cuda::synchronize();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  json r{{"mode", parallel ? "parallel_streams" : "sequential"},
         {"parameters", model->num_parameters()},
         {"median_ms", sorted[sorted.size() / 2]},
         {"min_ms", sorted.front()},
         {"mean_ms", std::accumulate(ms.begin(), ms.end(), 0.0) / static_cast<double>(ms.size())},
         {"times_ms", ms}};
#ifdef LONGNET_WITH_CUDA
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
  r["peak_allocated_bytes"] =
      stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
#endif
  return r;
}

int run(const Options& o) {
  if (!torch::cuda::is_available()) {
    std::cerr << "bench_fusion: needs a CUDA device, and torch sees none; nothing was measured\n";
    return 1;
  }
  if (o.batch < 1 || o.iters < 1 || o.warmup < 0) throw ConfigError("--batch and --iters must be >= 1, --warmup >= 0");
  if (o.dtype != "bf16" && o.dtype != "fp32") throw ConfigError("--dtype must be bf16 or fp32, got " + o.dtype);
  const torch::Dtype dtype = o.dtype == "bf16" ? torch::kBFloat16 : torch::kFloat;
  json records = json::array();
  for (bool parallel : {false, true}) records.push_back(measure(parallel, o, dtype));
  const double speedup = records[0]["median_ms"].get<double>() / records[1]["median_ms"].get<double>();
  std::printf("multimodal forward+backward, batch %lld, %s, fusion %s, tokens text %lld image %lld video %lld audio %lld\n",
              static_cast<long long>(o.batch), o.dtype.c_str(), o.strategy.c_str(), static_cast<long long>(kLengths[0]),
              static_cast<long long>(kLengths[1]), static_cast<long long>(kLengths[2]),
              static_cast<long long>(kLengths[3]));
  std::printf("%-18s %12s %10s %10s\n", "stacks", "parameters", "median ms", "min ms");
  for (const auto& r : records) {
    std::printf("%-18s %12lld %10.2f %10.2f\n", r["mode"].get<std::string>().c_str(),
                static_cast<long long>(r["parameters"].get<int64_t>()), r["median_ms"].get<double>(),
                r["min_ms"].get<double>());
  }
  std::printf("parallel / sequential speedup: %.3fx\n", speedup);
  if (!o.json_path.empty()) {
    const json doc{{"benchmark", "fusion_stacks"},
                   {"device", torch::cuda::device_count() > 0 ? "cuda:0" : "none"},
                   {"dtype", o.dtype},
                   {"batch", o.batch},
                   {"strategy", o.strategy},
                   {"lengths", {{"text", kLengths[0]}, {"image", kLengths[1]}, {"video", kLengths[2]},
                                {"audio", kLengths[3]}}},
                   {"records", records},
                   {"speedup", speedup}};
    write_file_atomic(o.json_path, doc.dump(2) + "\n");
    std::printf("wrote %s\n", o.json_path.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Multimodal LongNet forward+backward: per-modality stacks sequential vs on parallel CUDA streams"};
  Options o;
  app.add_option("--batch", o.batch, "Samples per step")->capture_default_str();
  app.add_option("--warmup", o.warmup, "Untimed steps first")->capture_default_str();
  app.add_option("--iters", o.iters, "Timed steps")->capture_default_str();
  app.add_option("--dtype", o.dtype, "bf16 or fp32")->capture_default_str();
  app.add_option("--strategy", o.strategy, "Fusion strategy")->capture_default_str();
  app.add_option("--json", o.json_path, "Write the records to this JSON file");
  CLI11_PARSE(app, argc, argv);
  return longnet::bench::run_reporting_errors([&o] { return run(o); });
}
