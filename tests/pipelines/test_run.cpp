// `longnet run` for the language-model task, end to end on a tiny corpus: the run folder, learning, checkpoints,
// and errors that leave nothing behind.
// GCC 12 at -O3 reports false -Wstringop-overflow and -Wrestrict inside libstdc++'s string copy inlined here (bounds
// of 2^63 and more).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#pragma GCC diagnostic ignored "-Wrestrict"
#pragma GCC diagnostic ignored "-Warray-bounds"
#endif
#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "pipelines/experiment_config.h"
#include "pipelines/multimodal_run.h"
#include "pipelines/run.h"
#include "pipelines/shards.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using longnet::modalities::Modality;
using longnet::pipelines::parse_experiment;
using longnet::pipelines::ShardReader;
using longnet::pipelines::run_experiment;
using longnet::test::read_text;
using longnet::test::TempDir;

namespace {

// A corpus with structure a small model can learn quickly: a few sentences repeated in a varying order.
std::string tiny_corpus() {
  const char* sentences[] = {"the cat sat on the mat. ", "a dog ran in the park. ", "birds sing at dawn. ",
                             "rain falls on the roof. "};
  std::string text;
  uint32_t state = 7;
  for (int i = 0; i < 600; ++i) {
    state = state * 1103515245u + 12345u;
    text += sentences[(state >> 16) % 4];
  }
  return text;
}

std::string config_text(const fs::path& corpus, const fs::path& out, int steps) {
  return "[run]\nname = \"tiny\"\ndevice = \"cpu\"\noutput_dir = \"" + out.string() +
         "\"\n[model]\nwidth = 32\ndepth = 1\nheads = 2\nmax_length = 64\n"
         "[attention]\nsegment_lengths = [16, 64]\ndilation_rates = [1, 4]\ncausal = true\n"
         "[data]\ncorpus = [\"" + corpus.string() + "\"]\nsequence_length = 64\n"
         "[train]\nsteps = " + std::to_string(steps) + "\nbatch_size = 8\nlr = 0.01\nwarmup_steps = 5\n"
         "log_every = 10\ncheckpoint_every = 20\nkeep_checkpoints = 2\n"
         "[eval]\nevery = 0\nbatches = 4\n";
}

}  // namespace

TEST_CASE("run_experiment trains a language model and writes its run folder", "[pipelines][cpu]") {
  const TempDir dir;
  const auto corpus = dir.write("corpus.txt", tiny_corpus());
  const auto config = parse_experiment(config_text(corpus, dir.path() / "runs", 60), "tiny.toml");

  const fs::path run = run_experiment(config);
  CHECK(run == dir.path() / "runs" / "tiny");
  // The resolved config in the folder reproduces the run's config.
  CHECK(longnet::pipelines::to_toml(parse_experiment(read_text(run / "config.toml"), "config.toml")) ==
        longnet::pipelines::to_toml(config));

  const auto summary = nlohmann::json::parse(read_text(run / "summary.json"));
  const double initial = summary["initial_val_bits_per_byte"], final_bpb = summary["final_val_bits_per_byte"];
  const double unigram = summary["unigram_bits_per_byte"];
  CAPTURE(initial, final_bpb, unigram);
  CHECK(summary["steps"] == 60);
  CHECK(final_bpb < initial);
  CHECK(final_bpb < unigram);  // it uses context, not only byte frequencies

  // metrics.jsonl: the step-0 evaluation, one record per 10 steps, and the final evaluation.
  std::ifstream metrics(run / "metrics.jsonl");
  int train_records = 0, eval_records = 0;
  for (std::string line; std::getline(metrics, line);) {
    const auto record = nlohmann::json::parse(line);
    const bool train = record["kind"] == "train";
    (train ? train_records : eval_records) += 1;
    CHECK(std::isfinite(record["loss"].get<double>()));
  }
  CHECK(train_records == 6);
  CHECK(eval_records == 2);

  // Checkpoints every 20 steps, the newest two kept, each a complete archive holding its step.
  CHECK_FALSE(fs::exists(run / "checkpoints" / "step_00000020.pt"));
  CHECK(fs::exists(run / "checkpoints" / "step_00000040.pt"));
  REQUIRE(fs::exists(run / "checkpoints" / "step_00000060.pt"));
  torch::serialize::InputArchive archive;
  archive.load_from((run / "checkpoints" / "step_00000060.pt").string());
  torch::Tensor step;
  archive.read("step", step);
  CHECK(step.item<int64_t>() == 60);
  for (const auto& e : fs::directory_iterator(run / "checkpoints")) CHECK(e.path().extension() == ".pt");

  // A second run of the same name gets its own folder; the first one is left as it was.
  const auto before = read_text(run / "summary.json");
  const auto short_config = parse_experiment(config_text(corpus, dir.path() / "runs", 5), "tiny.toml");
  CHECK(run_experiment(short_config) == dir.path() / "runs" / "tiny-2");
  CHECK(read_text(run / "summary.json") == before);
}

TEST_CASE("a resumed language-model run ends exactly where an uninterrupted one does", "[pipelines][cpu]") {
  const TempDir dir;
  const auto corpus = dir.write("corpus.txt", tiny_corpus());
  const auto config = parse_experiment(config_text(corpus, dir.path() / "runs", 60), "tiny.toml");
  const fs::path whole = run_experiment(config);

  // The state a kill after step 40 leaves: checkpoints up to 40, metrics written up to 50, no summary.
  const fs::path cut = dir.path() / "cut";
  fs::create_directories(cut / "checkpoints");
  fs::copy_file(whole / "config.toml", cut / "config.toml");
  fs::copy_file(whole / "checkpoints" / "step_00000040.pt", cut / "checkpoints" / "step_00000040.pt");
  std::ifstream in(whole / "metrics.jsonl");
  std::ofstream partial(cut / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    if (nlohmann::json::parse(line)["step"].get<int64_t>() <= 50) partial << line << "\n";
  }
  partial << "{\"step\": 5";  // a torn last line
  partial.close();

  CHECK(run_experiment(config, {.resume = cut}) == cut);
  const auto a = nlohmann::json::parse(read_text(whole / "summary.json"));
  const auto b = nlohmann::json::parse(read_text(cut / "summary.json"));
  CHECK(b["resumed_from_step"] == 40);
  CHECK(a["final_train_loss"] == b["final_train_loss"]);
  CHECK(a["final_val_bits_per_byte"] == b["final_val_bits_per_byte"]);
  // The metrics after step 40 were redone, not duplicated: the same records as the uninterrupted run.
  auto losses = [](const fs::path& file) {
    std::vector<std::pair<int64_t, double>> out;
    std::ifstream f(file);
    for (std::string line; std::getline(f, line);) {
      const auto r = nlohmann::json::parse(line);
      out.emplace_back(r["step"].get<int64_t>(), r["loss"].get<double>());
    }
    return out;
  };
  CHECK(losses(whole / "metrics.jsonl") == losses(cut / "metrics.jsonl"));

  // A folder that is not a run is refused.
  CHECK_THROWS_AS(run_experiment(config, {.resume = dir.path() / "nowhere"}), longnet::ConfigError);
}

TEST_CASE("run_experiment reports data errors before writing anything", "[pipelines][cpu]") {
  const TempDir dir;
  const auto out = dir.path() / "runs";
  SECTION("missing corpus file") {
    const auto config = parse_experiment(config_text(dir.path() / "nope.txt", out, 5), "tiny.toml");
    CHECK_THROWS_WITH(run_experiment(config), "corpus file '" + (dir.path() / "nope.txt").string() +
                                                  "' cannot be read: no such file");
  }
  SECTION("corpus too small for one window") {
    const auto corpus = dir.write("small.txt", "only a few bytes");
    const auto config = parse_experiment(config_text(corpus, out, 5), "tiny.toml");
    CHECK_THROWS_AS(run_experiment(config), longnet::DataError);
  }
  SECTION("bf16 on the CPU") {
    const auto corpus = dir.write("corpus.txt", tiny_corpus());
    const auto config =
        parse_experiment(config_text(corpus, out, 5), "tiny.toml", {"train.precision=\"bf16\""});
    CHECK_THROWS_WITH(run_experiment(config), "train.precision = \"bf16\" needs a CUDA device; this run uses the CPU");
  }
  CHECK_FALSE(fs::exists(out));
}

TEST_CASE("the failure policy skips injected non-finite and out-of-memory steps, counts them, or stops",
          "[pipelines][cpu]") {
  const TempDir dir;
  const auto corpus = dir.write("corpus.txt", tiny_corpus());
  longnet::pipelines::RunOptions faults;
  faults.inject_nonfinite_steps = {5};
  faults.inject_oom_steps = {7};
  SECTION("skipped and counted") {
    const auto config = parse_experiment(config_text(corpus, dir.path() / "runs", 20), "tiny.toml",
                                         {"train.skip_nonfinite=true", "train.skip_oom=true"});
    const fs::path run = run_experiment(config, faults);
    const auto summary = nlohmann::json::parse(read_text(run / "summary.json"));
    CHECK(summary["skipped_nonfinite_steps"] == 1);
    CHECK(summary["skipped_oom_steps"] == 1);
    CHECK(std::isfinite(summary["final_train_loss"].get<double>()));
    std::ifstream metrics(run / "metrics.jsonl");
    bool counted = false;
    for (std::string line; std::getline(metrics, line);) {
      const auto r = nlohmann::json::parse(line);
      if (r["kind"] == "train" && r["step"] == 10) {
        counted = r["skipped_nonfinite"] == 1 && r["skipped_oom"] == 1 && std::isfinite(r["loss"].get<double>());
      }
    }
    CHECK(counted);
  }
  SECTION("fatal without the policy") {
    const auto config = parse_experiment(config_text(corpus, dir.path() / "runs", 20), "tiny.toml");
    CHECK_THROWS_WITH(run_experiment(config, faults), Catch::Contains("training diverged: loss is nan at step 5") &&
                                                          Catch::Contains("train.skip_nonfinite"));
    longnet::pipelines::RunOptions oom_only;
    oom_only.inject_oom_steps = {3};
    CHECK_THROWS_WITH(run_experiment(config, oom_only), Catch::Contains("injected out-of-memory error at step 3"));
  }
  SECTION("too many in a row") {
    const auto config = parse_experiment(config_text(corpus, dir.path() / "runs", 20), "tiny.toml",
                                         {"train.skip_nonfinite=true", "train.max_skipped_steps=2"});
    longnet::pipelines::RunOptions three;
    three.inject_nonfinite_steps = {3, 4, 5};
    CHECK_THROWS_WITH(run_experiment(config, three), Catch::Contains("3 steps in a row were skipped"));
  }
}

TEST_CASE("the multimodal runner trains on shards, skips injected failures and writes its run folder",
          "[pipelines][cpu]") {
  const TempDir dir;
  // Text + video samples whose caption id says which of two patch patterns the video shows.
  for (const char* split : {"train", "val"}) {
    longnet::pipelines::ShardWriter writer(dir.path() / "shards" / split);
    for (int i = 0; i < 24; ++i) {
      const int cls = i % 2;
      auto patches = torch::full({4, 12}, cls == 0 ? -0.5 : 0.5) + 0.1 * torch::randn({4, 12});
      auto positions = torch::zeros({4, 3}, torch::kInt32);
      positions.select(1, 0).copy_(torch::arange(4, torch::kInt32));
      writer.add(std::string(split) + std::to_string(i),
                 {{"text_ids", torch::tensor({1, 4 + cls, 6 + i % 5, 2}, torch::kInt32)},
                  {"video_patches", patches.to(torch::kHalf)},
                  {"video_positions", positions},
                  {"label", torch::tensor({static_cast<int64_t>(cls)}, torch::kLong)}});
    }
    writer.finish();
  }
  const std::string text = "[run]\nname = \"mm\"\ntask = \"multimodal\"\ndevice = \"cpu\"\noutput_dir = \"" +
                           (dir.path() / "runs").string() +
                           "\"\n[model]\nwidth = 32\nheads = 2\n[data]\nshards = \"" +
                           (dir.path() / "shards").string() +
                           "\"\nloader_workers = 1\n[prepare]\nvideo_size = 32\nvideo_patch = 2\nvideo_tubelet = 1\n"
                           "tokenizer_vocab_size = 16\n"
                           "[modalities.text]\nenabled = true\ndepth = 1\nsegment_lengths = [8]\nvocab_size = 16\n"
                           "[modalities.video]\nenabled = true\ndepth = 1\nsegment_lengths = [4]\npatch_dim = 12\n"
                           "max_positions = 8\n[fusion]\ndepth = 1\nsegment_lengths = [8]\nembed_dim = 16\n"
                           "[train]\nsteps = 30\nbatch_size = 8\nlr = 0.01\nwarmup_steps = 3\nlog_every = 10\n"
                           "skip_nonfinite = true\nskip_oom = true\n[eval]\nevery = 0\nbatches = 0\n";
  const auto config = parse_experiment(text, "mm.toml");
  longnet::pipelines::RunOptions faults;
  faults.inject_nonfinite_steps = {4};
  faults.inject_oom_steps = {6};
  const fs::path run = run_experiment(config, faults);
  const auto summary = nlohmann::json::parse(read_text(run / "summary.json"));
  CAPTURE(summary.dump());
  CHECK(summary["skipped_nonfinite_steps"] == 1);
  CHECK(summary["skipped_oom_steps"] == 1);
  CHECK(summary["task"] == "multimodal");
  // Captions name one of two patch patterns: a model that learnt it ranks the 12 videos of the caption's pattern
  // first, so R@10 is at least 10/12 (chance: 10/24).
  CHECK(summary["retrieval"]["text_to_video"]["r10"].get<double>() > 70.0);
  CHECK(summary["retrieval"]["text_to_video"]["chance_r1"].get<double>() == Approx(100.0 / 24));
  CHECK(fs::exists(run / "retrieval.json"));
  CHECK(fs::exists(run / "checkpoints" / "step_00000030.pt"));

  // Held-out videos of two clips: the video and fused media embeddings are the normalised means of the clips'.
  auto write_val = [&](const std::string& name, bool first, bool second) {
    longnet::pipelines::ShardWriter writer(dir.path() / name);
    torch::manual_seed(21);
    for (int i = 0; i < 6; ++i) {
      auto a = (torch::full({4, 12}, i % 2 == 0 ? -0.5 : 0.5) + 0.2 * torch::randn({4, 12})).to(torch::kHalf);
      auto b = (torch::full({4, 12}, i % 2 == 0 ? -0.5 : 0.5) + 0.2 * torch::randn({4, 12})).to(torch::kHalf);
      auto positions = torch::zeros({4, 3}, torch::kInt32);
      positions.select(1, 0).copy_(torch::arange(4, torch::kInt32));
      longnet::pipelines::SampleTensors s{{"text_ids", torch::tensor({1, 4 + i % 2, 2}, torch::kInt32)},
                                          {"video_patches", first ? a : b},
                                          {"video_positions", positions}};
      if (first && second) {
        s.emplace_back("video_patches_clip1", b);
        s.emplace_back("video_positions_clip1", positions);
      }
      writer.add("c" + std::to_string(i), s);
    }
    writer.finish();
    return dir.path() / name;
  };
  const auto only_a = write_val("val_a", true, false), only_b = write_val("val_b", false, true),
             both = write_val("val_ab", true, true);
  auto trained = longnet::pipelines::load_trained_model(run, {}, torch::kCPU);
  auto embed = [&](const fs::path& d) {
    const ShardReader reader(d);
    return longnet::pipelines::embed_split(trained.model, reader, torch::kCPU, {.loader_workers = 1});
  };
  const auto ea = embed(only_a), eb = embed(only_b), eab = embed(both);
  CHECK(ea.video_clips == 1);
  CHECK(eab.video_clips == 2);
  const size_t v = static_cast<size_t>(Modality::video);
  namespace F = torch::nn::functional;
  const auto mean_video = F::normalize(ea.modality[v] + eb.modality[v], F::NormalizeFuncOptions().dim(1));
  const auto mean_media = F::normalize(ea.media + eb.media, F::NormalizeFuncOptions().dim(1));
  CHECK(torch::allclose(eab.modality[v], mean_video, 1e-5, 1e-6));
  CHECK(torch::allclose(eab.media, mean_media, 1e-5, 1e-6));
  CHECK(torch::equal(eab.modality[static_cast<size_t>(Modality::text)], ea.modality[static_cast<size_t>(Modality::text)]));
  const auto report = longnet::pipelines::retrieval_report(eab);
  CHECK(report["text_to_video"]["video_clips"] == 2);
  CHECK(report["text_to_video"]["protocol"].get<std::string>().find("mean of its 2 clips") != std::string::npos);
}

TEST_CASE("a multimodal run over two weighted sources resumes mid-epoch to the uninterrupted result",
          "[pipelines][cpu]") {
  const TempDir dir;
  // Source a: 24 train samples (and the val split evaluation uses); source b: 10 train samples of its own.
  auto write = [&](const fs::path& shards, const std::string& split, int count, const std::string& prefix) {
    longnet::pipelines::ShardWriter writer(shards / split);
    for (int i = 0; i < count; ++i) {
      const int cls = i % 2;
      auto positions = torch::zeros({3, 3}, torch::kInt32);
      positions.select(1, 0).copy_(torch::arange(3, torch::kInt32));
      writer.add(prefix + std::to_string(i),
                 {{"text_ids", torch::tensor({1, 4 + cls, 6 + i % 5, 2}, torch::kInt32)},
                  {"video_patches", (torch::full({3, 12}, cls == 0 ? -0.5 : 0.5) + 0.1 * torch::randn({3, 12}))
                                        .to(torch::kHalf)},
                  {"video_positions", positions}});
    }
    writer.finish();
  };
  write(dir.path() / "a", "train", 24, "a");
  write(dir.path() / "a", "val", 12, "v");
  write(dir.path() / "b", "train", 10, "b");
  const std::string text = "[run]\nname = \"mix\"\ntask = \"multimodal\"\ndevice = \"cpu\"\noutput_dir = \"" +
                           (dir.path() / "runs").string() +
                           "\"\n[model]\nwidth = 32\nheads = 2\n[data]\nepoch_samples = 20\nloader_workers = 2\n"
                           "sources = [{shards = \"" + (dir.path() / "a").string() + "\"}, {shards = \"" +
                           (dir.path() / "b").string() + "\", weight = 3.0}]\n"
                           "[prepare]\nvideo_size = 32\nvideo_patch = 2\nvideo_tubelet = 1\ntokenizer_vocab_size = 16\n"
                           "[modalities.text]\nenabled = true\ndepth = 1\nsegment_lengths = [8]\nvocab_size = 16\n"
                           "[modalities.video]\nenabled = true\ndepth = 1\nsegment_lengths = [4]\npatch_dim = 12\n"
                           "max_positions = 8\n[fusion]\ndepth = 1\nsegment_lengths = [8]\nembed_dim = 16\n"
                           "[train]\nsteps = 12\nbatch_size = 8\nlr = 0.01\nwarmup_steps = 3\nlog_every = 1\n"
                           "checkpoint_every = 5\nkeep_checkpoints = 3\n[eval]\nevery = 0\nbatches = 0\n";
  const auto config = parse_experiment(text, "mix.toml");
  const fs::path whole = run_experiment(config);
  // 20 samples an epoch in batches of 8: two batches, so the step-5 checkpoint lies in the middle of epoch 2.
  const fs::path cut = dir.path() / "cut";
  fs::create_directories(cut / "checkpoints");
  fs::copy_file(whole / "config.toml", cut / "config.toml");
  fs::copy_file(whole / "checkpoints" / "step_00000005.pt", cut / "checkpoints" / "step_00000005.pt");
  CHECK(run_experiment(config, {.resume = cut}) == cut);
  const auto a = nlohmann::json::parse(read_text(whole / "summary.json"));
  const auto b = nlohmann::json::parse(read_text(cut / "summary.json"));
  CHECK(b["resumed_from_step"] == 5);
  CHECK(a["final_train_loss"] == b["final_train_loss"]);
  CHECK(a["retrieval"]["text_to_video"] == b["retrieval"]["text_to_video"]);
  auto losses = [](const fs::path& file) {
    std::vector<std::pair<int64_t, double>> out;
    std::ifstream f(file);
    for (std::string line; std::getline(f, line);) {
      const auto r = nlohmann::json::parse(line);
      if (r["kind"] == "train") out.emplace_back(r["step"].get<int64_t>(), r["loss"].get<double>());
    }
    return out;
  };
  const auto all = losses(whole / "metrics.jsonl");
  REQUIRE(all.size() == 12);
  // Steps 6..12, drawn from the middle of epoch 2 on, are the uninterrupted run's to the last bit.
  CHECK(losses(cut / "metrics.jsonl") == std::vector<std::pair<int64_t, double>>(all.begin() + 5, all.end()));
  // The resolved config written into the run folder keeps both sources.
  CHECK(parse_experiment(read_text(whole / "config.toml"), "config.toml").data.sources.size() == 2);
}
