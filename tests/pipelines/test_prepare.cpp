// `longnet prepare` (pipelines/prepare.h) on a small demo dataset made by tools/make_demo_dataset.py (ffmpeg lavfi
// videos, espeak-ng speech): shards per split with the documented fields, bad media reported and skipped (or
// stopping the run), and a rerun that resumes instead of redoing the work.
#include <cstdlib>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "modalities/tokenizer.h"
#include "pipelines/loader.h"
#include "pipelines/manifest.h"
#include "pipelines/prepare.h"
#include "pipelines/shards.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using longnet::pipelines::PrepareOptions;
using longnet::pipelines::ShardReader;
using longnet::test::read_text;
using longnet::test::TempDir;

namespace {

// 8 demo samples plus two bad ones: a corrupt video and a missing audio file.
fs::path make_dataset(const TempDir& tmp) {
  const auto dir = tmp.path() / "demo";
  const std::string command = std::string(LONGNET_TEST_PYTHON) + " tools/make_demo_dataset.py --out '" +
                              dir.string() + "' --count 8 --size 64 --fps 8 --min-seconds 1 --max-seconds 1.5 " +
                              "--jobs 2 --progress-every 0 --seed 3 --no-video-fraction 0.2 " +
                              "--no-audio-fraction 0.2 --no-text-fraction 0.2 --val-fraction 0.25 --test-fraction 0";
  REQUIRE(std::system(command.c_str()) == 0);
  {
    std::ofstream garbage(dir / "corrupt.mp4", std::ios::binary);
    for (int i = 0; i < 5000; ++i) garbage.put(static_cast<char>((i * 7919) % 251));
  }
  std::ofstream manifest(dir / "manifest.jsonl", std::ios::app);
  manifest << R"({"id": "bad-video", "split": "train", "video": "corrupt.mp4", "text": "a broken file"})" << "\n";
  manifest << R"({"id": "no-audio-file", "split": "train", "audio": "audio/missing.wav"})" << "\n";
  return dir;
}

PrepareOptions options_for(const fs::path& dataset, const fs::path& out, const fs::path& tokenizer) {
  PrepareOptions o;
  o.manifest = dataset / "manifest.jsonl";
  o.output = out;
  o.tokenizer = tokenizer;
  o.image = {.height = 64, .width = 64};
  o.video.num_frames = 4;
  o.video.height = o.video.width = 64;
  o.video.threads = 1;
  o.video_patch = 16;
  o.video_tubelet = 2;
  o.mel_frames_per_patch = 8;
  o.workers = 2;
  o.progress = false;
  return o;
}

}  // namespace

TEST_CASE("prepare turns a manifest into shards, reports bad media and resumes", "[pipelines]") {
  TempDir tmp;
  const auto dataset = make_dataset(tmp);
  const auto manifest = longnet::pipelines::Manifest::load(dataset / "manifest.jsonl", {.check_files = false});
  const auto model = tmp.path() / "tok";
  longnet::text::Tokenizer::train(manifest.captions(), "captions", model,
                                        {.vocab_size = 60, .model_type = "bpe"});
  const auto out = tmp.path() / "shards";
  const auto summary = longnet::pipelines::prepare_dataset(options_for(dataset, out, model.string() + ".model"));

  CHECK(summary.samples == 10);
  CHECK(summary.skipped == 2);
  CHECK(summary.prepared == 8);
  REQUIRE(summary.bad.size() == 2);
  CHECK(summary.bad[0].first == "bad-video");
  CHECK_THAT(summary.bad[0].second, Catch::StartsWith("video: ") && Catch::Contains("corrupt.mp4"));
  CHECK(summary.bad[1].first == "no-audio-file");
  CHECK_THAT(summary.bad[1].second, Catch::StartsWith("audio: ") && Catch::Contains("missing.wav"));
  const auto bad_lines = read_text(out / "bad_samples.jsonl");
  CHECK_THAT(bad_lines, Catch::Contains("\"id\":\"bad-video\""));
  const auto report = nlohmann::json::parse(read_text(out / "prepare_summary.json"));
  CHECK(report["skipped_bad"] == 2);

  // Every good sample is in its split's shards with the fields its manifest entry asks for.
  const ShardReader train(out / "train"), val(out / "val");
  CHECK(train.size() + val.size() == 8);
  for (const auto& s : manifest.samples()) {
    if (s.id == "bad-video" || s.id == "no-audio-file") continue;
    CAPTURE(s.id);
    const ShardReader& reader = s.split == longnet::pipelines::Split::val ? val : train;
    const auto index = reader.find(s.id);
    REQUIRE(index.has_value());
    const auto fields = reader.read(*index);
    CHECK(fields.count("text_ids") == (s.text.empty() ? 0U : 1U));
    CHECK(fields.count("video_patches") == (s.video ? 1U : 0U));
    CHECK(fields.count("audio_patches") == (s.audio ? 1U : 0U));
    if (s.video) {
      // 4 frames in tubelets of 2, 64×64 in 16×16 patches: 2 · 4 · 4 patches of 2·16·16·3 values.
      CHECK(fields.at("video_patches").sizes() == at::IntArrayRef{32, 1536});
      CHECK(fields.at("video_patches").scalar_type() == torch::kHalf);
      CHECK(fields.at("video_positions").sizes() == at::IntArrayRef{32, 3});
    }
    if (s.audio) {
      CHECK(fields.at("audio_patches").size(1) == 8 * 80);
      CHECK(fields.at("audio_patches").size(0) >= 8);  // ≥ 1 s of speech at 100 frames/s, 8 frames a patch
    }
    if (!s.text.empty()) {
      const auto ids = fields.at("text_ids");
      CHECK(ids.scalar_type() == torch::kInt);
      const auto tok = longnet::text::Tokenizer::load(model.string() + ".model");
      CHECK(ids[0].item<int>() == tok.bos_id());
      const auto captions = fields.at("captions");
      std::string joined;  // every caption, one per line
      for (const auto& caption : s.text) joined += (joined.empty() ? "" : "\n") + caption;
      CHECK(std::string(reinterpret_cast<const char*>(captions.data_ptr<uint8_t>()),
                        static_cast<size_t>(captions.numel())) == joined);
    }
  }
  // The loader reads what prepare wrote.
  longnet::pipelines::Loader loader(train, {.batch_size = 2, .workers = 1});
  const auto batch = loader.next().value();
  CHECK(batch.input.present.any().item<bool>());

  // A rerun keeps what is stored and only retries the bad samples.
  const auto again = longnet::pipelines::prepare_dataset(options_for(dataset, out, model.string() + ".model"));
  CHECK(again.kept == 8);
  CHECK(again.prepared == 0);
  CHECK(again.skipped == 2);

  // on_bad = fail stops at the first bad sample, naming it and its manifest line.
  auto strict = options_for(dataset, tmp.path() / "strict", model.string() + ".model");
  strict.on_bad = "fail";
  CHECK_THROWS_AS(longnet::pipelines::prepare_dataset(strict), longnet::DataError);
  CHECK_THROWS_WITH(longnet::pipelines::prepare_dataset(strict),
                    Catch::Contains("manifest.jsonl:9: sample 'bad-video'") && Catch::Contains("corrupt.mp4"));
}

TEST_CASE("prepare rejects bad options and captions without a tokenizer", "[pipelines]") {
  PrepareOptions o;
  CHECK_THROWS_WITH(o.validate(), "prepare: a manifest is required");
  o.manifest = "m.jsonl";
  o.output = "out";
  o.on_bad = "ignore";
  CHECK_THROWS_WITH(o.validate(), "prepare: on_bad must be \"skip\" or \"fail\", got \"ignore\"");
  o.on_bad = "skip";
  o.mel.sample_rate = 22050;
  CHECK_THROWS_AS(o.validate(), longnet::ConfigError);

  TempDir tmp;
  std::ofstream(tmp.path() / "m.jsonl") << R"({"id": "a", "text": "hello"})" << "\n";
  PrepareOptions p;
  p.manifest = tmp.path() / "m.jsonl";
  p.output = tmp.path() / "out";
  CHECK_THROWS_WITH(longnet::pipelines::prepare_dataset(p), Catch::Contains("needs") || Catch::Contains("tokenizer"));
  CHECK_FALSE(fs::exists(tmp.path() / "out" / "prepare_summary.json"));
}

TEST_CASE("fit_audio crops longer clips and pads, loops or keeps shorter ones", "[pipelines]") {
  using longnet::pipelines::AudioFitted;
  using longnet::pipelines::fit_audio;
  std::vector<float> longer{1, 2, 3, 4, 5};
  CHECK(fit_audio(longer, 3, "pad") == AudioFitted::cropped);
  CHECK(longer == std::vector<float>{1, 2, 3});
  std::vector<float> padded{1, 2};
  CHECK(fit_audio(padded, 5, "pad") == AudioFitted::padded);
  CHECK(padded == std::vector<float>{1, 2, 0, 0, 0});
  std::vector<float> looped{1, 2};
  CHECK(fit_audio(looped, 5, "loop") == AudioFitted::looped);
  CHECK(looped == std::vector<float>{1, 2, 1, 2, 1});
  std::vector<float> kept{1, 2};
  CHECK(fit_audio(kept, 5, "crop") == AudioFitted::unchanged);
  CHECK(kept == std::vector<float>{1, 2});
  std::vector<float> exact{1, 2, 3};
  CHECK(fit_audio(exact, 3, "loop") == AudioFitted::unchanged);
  std::vector<float> empty;
  CHECK(fit_audio(empty, 2, "loop") == AudioFitted::padded);  // nothing to repeat: silence
  CHECK(empty == std::vector<float>{0, 0});
  CHECK_THROWS_AS(fit_audio(exact, 3, "stretch"), longnet::ConfigError);
}
