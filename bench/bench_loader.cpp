// `bench_loader`: how fast pipelines::Loader turns prepared shards into batches, with the options `longnet run` uses
// for a CUDA run (float16 patches in page-locked memory) or a CPU run (float32), and what that costs the process in
// CPU time. A training step consumes one batch; the loader keeps up when its batches/s exceeds the steps/s, and its
// CPU time a batch is what it takes away from the thread that launches the GPU's work. Prints a table and, with
// --json PATH, writes the record there. Runs on any machine (--pin needs a CUDA device).
//
//   tools/make_synthetic_shards.py --out /tmp/syn/train --samples 64 --text-tokens 256 --vocab-size 8000
//       --video-frames 160 --video-grid 14 --video-dim 768 --audio-patches 500 --audio-dim 320   (one line)
//   bench_loader --shards /tmp/syn/train --batch-size 4 --workers 6 --half --pin --json results/loader.json
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "bench/bench_main.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "pipelines/loader.h"
#include "pipelines/shards.h"

namespace {

using namespace longnet;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Options {
  std::string shards, json_path;
  int64_t batch_size = 4, workers = 6, prefetch = 4, batches = 40, warmup = 4;
  bool half = false, pin = false, verify = false;
};

double cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * t.tv_usec; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

// Non-padding tokens of a batch, over its modalities. A plain loop: a torch reduction here would start OpenMP threads
// whose spinning the CPU time below would charge to the loader.
int64_t batch_tokens(const pipelines::Batch& batch) {
  int64_t tokens = 0;
  for (const auto& m : batch.input.modalities) {
    if (!m) continue;
    const bool* padding = m->padding.data_ptr<bool>();
    tokens += std::count(padding, padding + m->padding.numel(), false);
  }
  return tokens;
}

int run(const Options& o) {
  if (o.pin && !torch::cuda::is_available()) throw ConfigError("--pin needs a CUDA device (page-locked memory)");
  const pipelines::ShardReader reader(o.shards, {.verify_checksums = o.verify});
  pipelines::LoaderOptions lo;
  lo.batch_size = o.batch_size;
  lo.workers = o.workers;
  lo.prefetch = o.prefetch;
  lo.half_patches = o.half;
  lo.pin_memory = o.pin;
  lo.sample_captions = lo.sample_video_clips = true;  // as `longnet run` trains

  // One thread, no prefetch: the cost of collating a batch by itself.
  const pipelines::Loader probe(reader, lo);
  std::vector<double> collate_ms;
  for (int64_t i = 0; i < std::min<int64_t>(4, probe.batches_per_epoch()); ++i) {
    const auto start = Clock::now();
    (void)probe.collate(probe.batch_samples(0, i));
    collate_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  }
  std::sort(collate_ms.begin(), collate_ms.end());

  pipelines::Loader loader(reader, lo);
  for (int64_t i = 0; i < o.warmup; ++i) (void)loader.next();
  // Let the workers fill the prefetch queue again, so that the timed window starts from the steady state a training
  // run sees after its first steps.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const double wait_before = loader.wait_seconds();
  const double cpu_before = cpu_seconds();
  const auto start = Clock::now();
  int64_t samples = 0, tokens = 0;
  for (int64_t i = 0; i < o.batches; ++i) {
    const auto batch = loader.next();
    samples += static_cast<int64_t>(batch->samples.size());
    tokens += batch_tokens(*batch);
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const double cpu = cpu_seconds() - cpu_before;

  json record = {{"shards", o.shards},
                 {"samples_in_shards", reader.size()},
                 {"batch_size", o.batch_size},
                 {"workers", o.workers},
                 {"prefetch", o.prefetch},
                 {"half_patches", o.half},
                 {"pin_memory", o.pin},
                 {"hardware_threads", std::thread::hardware_concurrency()},
                 {"torch_threads", at::get_num_threads()},
                 {"batches", o.batches},
                 {"seconds", seconds},
                 {"batches_per_s", static_cast<double>(o.batches) / seconds},
                 {"samples_per_s", static_cast<double>(samples) / seconds},
                 {"tokens_per_s", static_cast<double>(tokens) / seconds},
                 {"cpu_seconds_per_batch", cpu / static_cast<double>(o.batches)},
                 {"wait_seconds", loader.wait_seconds() - wait_before},
                 {"collate_ms_median_one_thread", collate_ms.empty() ? 0.0 : collate_ms[collate_ms.size() / 2]}};
  std::printf("loader: %lld workers, batch %lld, %s patches%s, %u hardware threads\n",
              static_cast<long long>(o.workers), static_cast<long long>(o.batch_size), o.half ? "float16" : "float32",
              o.pin ? " (pinned)" : "", std::thread::hardware_concurrency());
  std::printf("  %.2f batches/s  %.1f samples/s  %.0f tokens/s  %.3f CPU s a batch  collate (one thread) %.1f ms\n",
              record["batches_per_s"].get<double>(), record["samples_per_s"].get<double>(),
              record["tokens_per_s"].get<double>(), record["cpu_seconds_per_batch"].get<double>(),
              record["collate_ms_median_one_thread"].get<double>());
  if (!o.json_path.empty()) write_file_atomic(o.json_path, record.dump(2) + "\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"pipelines::Loader throughput and CPU cost on prepared shards"};
  Options o;
  app.add_option("--shards", o.shards, "a prepared split: a folder with index.json")->required();
  app.add_option("--batch-size", o.batch_size, "samples a batch")->check(CLI::PositiveNumber);
  app.add_option("--workers", o.workers, "loader threads")->check(CLI::PositiveNumber);
  app.add_option("--prefetch", o.prefetch, "batches ready ahead")->check(CLI::PositiveNumber);
  app.add_option("--batches", o.batches, "timed batches")->check(CLI::PositiveNumber);
  app.add_option("--warmup", o.warmup, "batches before timing")->check(CLI::NonNegativeNumber);
  app.add_flag("--half", o.half, "float16 patches (what a CUDA run loads)");
  app.add_flag("--pin", o.pin, "page-locked batches (what a CUDA run loads; needs a CUDA device)");
  app.add_flag("--verify-checksums", o.verify, "check every shard's CRC-32 when opening");
  app.add_option("--json", o.json_path, "write the record here");
  CLI11_PARSE(app, argc, argv);
  return bench::run_reporting_errors([&] { return run(o); });
}
