// `longnet run` for the language-model task, end to end on a tiny corpus: the run folder, learning, checkpoints,
// and errors that leave nothing behind.
#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "pipelines/experiment_config.h"
#include "pipelines/run.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using longnet::pipelines::parse_experiment;
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
