// `longnet embed` and `longnet ablate` (any build), `longnet prepare` (media build):
//
//   longnet prepare experiments/quickstart.toml          # data.manifest → data.shards (trains data.tokenizer if absent)
//   longnet embed runs/quickstart --split test --out test.safetensors   # or --out emb/ for .npy files
//   longnet ablate experiments/fusion_ablation.toml      # strategies × missing rates × seeds → table and plot
#include <cmath>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "apps/longnet/commands.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "pipelines/ablation.h"
#include "pipelines/embeddings_io.h"
#include "pipelines/experiment_config.h"
#include "pipelines/multimodal_run.h"
#include "pipelines/training.h"
#ifdef LONGNET_WITH_MEDIA
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "modalities/tokenizer.h"
#include "pipelines/manifest.h"
#include "pipelines/prepare.h"
#endif

namespace longnet::app {
namespace {
namespace fs = std::filesystem;
using modalities::Modality;

struct EmbedArgs {
  std::string run_dir, checkpoint, split = "val", shards, out, format, device = "auto";
  int64_t batch_size = 32;
};

void embed(const EmbedArgs& a) {
  pipelines::RunConfig device_choice;
  device_choice.device = a.device;
  const auto device = pipelines::choose_device(device_choice);
  auto trained = pipelines::load_trained_model(a.run_dir, a.checkpoint, device);
  const fs::path shards = !a.shards.empty() ? fs::path(a.shards) : fs::path(trained.config.data.shards) / a.split;
  if (!fs::exists(shards / "index.json")) {
    throw ConfigError("embed: no prepared samples in '" + shards.string() + "' (index.json missing)");
  }
  const pipelines::ShardReader reader(shards);
  pipelines::EmbedOptions options;
  options.batch_size = a.batch_size;
  options.bf16 = trained.config.train.precision == "bf16" && device.is_cuda();
  const auto e = pipelines::embed_split(trained.model, reader, device, options);

  pipelines::NamedTensors tensors;
  for (const Modality m : modalities::kAllModalities) {
    if (e.modality[static_cast<size_t>(m)].defined()) {
      tensors.emplace_back(modalities::to_string(m), e.modality[static_cast<size_t>(m)]);
    }
  }
  tensors.emplace_back("media", e.media);
  tensors.emplace_back("present", e.present);
  tensors.emplace_back("media_present", e.media_present);
  const std::string format =
      !a.format.empty() ? a.format : fs::path(a.out).extension() == ".safetensors" ? "safetensors" : "npy";
  if (format == "safetensors") {
    pipelines::write_embeddings_safetensors(a.out, tensors, e.ids);
  } else {
    pipelines::write_embeddings_npy(a.out, tensors, e.ids);
  }
  log::info("embed: " + std::to_string(e.ids.size()) + " samples of " + shards.string() + " (checkpoint " +
            trained.checkpoint.filename().string() + ") → " + a.out + " (" + format + ")");
}

#ifdef LONGNET_WITH_MEDIA
// R@1 of the first pair (text → media) per strategy, one bar per missing rate, with ± one standard deviation over
// the seeds and the chance level as a dashed line.
void plot_ablation(const pipelines::AblationResult& r, const pipelines::ExperimentConfig& c) {
  const auto pairs = pipelines::ablation_pairs(r);
  if (pairs.empty()) return;
  const std::string pair = pairs.front();
  const int W = 900, H = 520, left = 70, right = 20, top = 50, bottom = 90;
  cv::Mat img(H, W, CV_8UC3, cv::Scalar(255, 255, 255));
  double top_value = 1, chance = 0;
  for (const auto& s : c.ablate.strategies) {
    for (const double rate : c.ablate.missing_rates) {
      const auto st = pipelines::cell_stat(r, s, rate, pair, "r1");
      top_value = std::max(top_value, st.mean + st.stddev);
      chance = std::max(chance, st.chance);
    }
  }
  top_value = std::ceil(top_value / 10.0) * 10.0;
  auto y_of = [&](double v) { return top + static_cast<int>((H - top - bottom) * (1.0 - v / top_value)); };
  const cv::Scalar ink(40, 40, 40);
  const int font = cv::FONT_HERSHEY_SIMPLEX;
  cv::putText(img, "held-out " + pair + " R@1 (%), mean +- sd over seeds", {left, 30}, font, 0.6, ink, 1, cv::LINE_AA);
  cv::line(img, {left, top}, {left, H - bottom}, ink);
  cv::line(img, {left, H - bottom}, {W - right, H - bottom}, ink);
  for (int t = 0; t <= 5; ++t) {
    const double v = top_value * t / 5.0;
    cv::putText(img, std::to_string(static_cast<int>(v)), {10, y_of(v) + 5}, font, 0.45, ink, 1, cv::LINE_AA);
    cv::line(img, {left - 4, y_of(v)}, {left, y_of(v)}, ink);
  }
  const cv::Scalar colours[] = {{180, 119, 31}, {14, 127, 255}, {44, 160, 44}, {40, 39, 214}, {189, 103, 148}};
  const int groups = static_cast<int>(c.ablate.strategies.size());
  const int bars = static_cast<int>(c.ablate.missing_rates.size());
  const double group_w = static_cast<double>(W - left - right) / groups;
  const double bar_w = group_w * 0.8 / bars;
  for (int g = 0; g < groups; ++g) {
    const int x0 = left + static_cast<int>(g * group_w + group_w * 0.1);
    for (int b = 0; b < bars; ++b) {
      const auto st = pipelines::cell_stat(r, c.ablate.strategies[static_cast<size_t>(g)],
                                           c.ablate.missing_rates[static_cast<size_t>(b)], pair, "r1");
      if (st.count == 0) continue;
      const int x = x0 + static_cast<int>(b * bar_w);
      cv::rectangle(img, {x, y_of(st.mean)}, {x + static_cast<int>(bar_w) - 2, H - bottom}, colours[b % 5],
                    cv::FILLED);
      if (st.count > 1) {
        const int xc = x + static_cast<int>(bar_w / 2);
        cv::line(img, {xc, y_of(st.mean + st.stddev)}, {xc, y_of(std::max(0.0, st.mean - st.stddev))}, ink, 2);
      }
    }
    cv::putText(img, c.ablate.strategies[static_cast<size_t>(g)], {x0, H - bottom + 22}, font, 0.5, ink, 1,
                cv::LINE_AA);
  }
  for (int x = left; x < W - right; x += 12) {  // chance, dashed
    cv::line(img, {x, y_of(chance)}, {std::min(x + 6, W - right), y_of(chance)}, {0, 0, 200}, 1);
  }
  cv::putText(img, "chance", {W - right - 60, y_of(chance) - 5}, font, 0.45, {0, 0, 200}, 1, cv::LINE_AA);
  for (int b = 0; b < bars; ++b) {
    const int x = left + 10 + b * 170;
    cv::rectangle(img, {x, H - 35}, {x + 14, H - 21}, colours[b % 5], cv::FILLED);
    char label[64];
    std::snprintf(label, sizeof(label), "missing rate %g", c.ablate.missing_rates[static_cast<size_t>(b)]);
    cv::putText(img, label, {x + 20, H - 22}, font, 0.45, ink, 1, cv::LINE_AA);
  }
  std::vector<uchar> png;
  if (!cv::imencode(".png", img, png)) throw IoError("ablate: could not encode the plot as PNG");
  write_file_atomic(r.dir / "ablation.png", std::string(png.begin(), png.end()));
}

struct PrepareArgs {
  std::string config;
  std::vector<std::string> sets;
};

void prepare(const PrepareArgs& a) {
  const auto c = pipelines::load_experiment(a.config, a.sets);
  const std::string where = a.config + ": ";
  const std::vector<pipelines::DataSource> sources = pipelines::training_sources(c.data);
  for (size_t i = 0; i < sources.size(); ++i) {
    const std::string name = c.data.sources.empty() ? "data." : "data.sources[" + std::to_string(i) + "].";
    if (sources[i].manifest.empty()) throw ConfigError(where + name + "manifest must name the manifest to prepare");
    if (sources[i].shards.empty()) throw ConfigError(where + name + "shards must name the folder to write");
  }
  if (c.data.tokenizer.empty()) throw ConfigError(where + "data.tokenizer must name the SentencePiece model file");
  const auto& p = c.prepare;
  if (!fs::exists(c.data.tokenizer)) {
    // Captions of the train splits only: held-out captions must not shape the vocabulary.
    std::vector<std::string> captions;
    std::string manifests;
    for (const auto& source : sources) {
      const auto manifest = pipelines::Manifest::load(source.manifest, {.check_files = false});
      for (const auto* s : manifest.split(pipelines::Split::train)) {
        captions.insert(captions.end(), s->text.begin(), s->text.end());
      }
      manifests += (manifests.empty() ? "" : ", ") + source.manifest;
    }
    if (!captions.empty()) {
      text::TrainOptions options;
      options.vocab_size = static_cast<int32_t>(p.tokenizer_vocab_size);
      fs::path prefix = c.data.tokenizer;
      if (prefix.extension() != ".model") {
        throw ConfigError(where + "data.tokenizer must end in .model (the SentencePiece model file), got \"" +
                          c.data.tokenizer + "\"");
      }
      prefix.replace_extension();
      log::info("prepare: training a " + std::to_string(p.tokenizer_vocab_size) + "-piece tokenizer on " +
                std::to_string(captions.size()) + " train captions → " + c.data.tokenizer);
      try {
        text::Tokenizer::train(captions, manifests + " (train captions)", prefix, options);
      } catch (const DataError& e) {
        throw ConfigError(where + "prepare.tokenizer_vocab_size = " + std::to_string(p.tokenizer_vocab_size) +
                          " is too large for the train captions of " + manifests + ": " + e.what());
      }
    }
  }
  pipelines::PrepareOptions o;
  o.tokenizer = c.data.tokenizer;
  o.text_max_tokens = p.text_max_tokens;
  o.image.height = o.image.width = static_cast<int>(p.image_size);
  o.image_patch = static_cast<int>(p.image_patch);
  o.video.height = o.video.width = static_cast<int>(p.video_size);
  o.video.clip_seconds = p.video_clip_seconds;
  o.eval_clips = static_cast<int>(p.eval_clips);
  o.train_clips = static_cast<int>(p.train_clips);
  if (p.video_fps > 0) {
    o.video.sampling = modalities::FrameSampling::fps;
    o.video.fps = p.video_fps;
  } else {
    o.video.sampling = modalities::FrameSampling::uniform;
    o.video.num_frames = static_cast<int>(p.video_frames);
  }
  o.video_patch = static_cast<int>(p.video_patch);
  o.video_tubelet = static_cast<int>(p.video_tubelet);
  o.audio_max_seconds = p.audio_max_seconds;
  o.audio_seconds = p.audio_seconds;
  o.audio_fit = p.audio_fit;
  o.mel.n_mels = static_cast<int>(p.mel_bins);
  o.mel_frames_per_patch = static_cast<int>(p.mel_frames_per_patch);
  o.workers = static_cast<int>(p.workers);
  o.on_bad = p.on_bad;
  o.max_shard_bytes = p.max_shard_mb << 20;
  o.classes = c.eval.zero_shot_classes;
  std::vector<pipelines::PrepareSummary> summaries;
  for (const auto& source : sources) {
    o.manifest = source.manifest;
    o.output = source.shards;
    const auto& summary = summaries.emplace_back(pipelines::prepare_dataset(o));
    std::cout << "prepared " << summary.prepared << ", kept " << summary.kept << ", skipped " << summary.skipped
              << " bad of " << summary.samples << " samples → " << source.shards << "\n";
    for (const auto& [id, reason] : summary.bad) std::cout << "  skipped " << id << ": " << reason << "\n";
    if (p.audio_seconds > 0) {
      std::cout << "audio fitted to " << p.audio_seconds << " s: " << summary.audio_cropped << " cropped, "
                << summary.audio_padded << " padded, " << summary.audio_looped << " looped\n";
    }
  }
  if (!c.eval.zero_shot_classes.empty()) {
    // The zero-shot prompts, tokenised here so that training and evaluation need no tokenizer (GPU hosts have none).
    const auto tokenizer = text::Tokenizer::load(c.data.tokenizer);
    nlohmann::json ids = nlohmann::json::array();
    for (const auto& name : c.eval.zero_shot_classes) {
      nlohmann::json per_class = nlohmann::json::array();
      for (const auto& t : c.eval.zero_shot_templates) {
        const auto slot = t.find("{}");
        auto prompt = tokenizer.encode(t.substr(0, slot) + name + t.substr(slot + 2), true, true);
        if (static_cast<int64_t>(prompt.size()) > p.text_max_tokens) {
          prompt.resize(static_cast<size_t>(p.text_max_tokens));
          prompt.back() = tokenizer.eos_id();
        }
        per_class.push_back(prompt);
      }
      ids.push_back(per_class);
    }
    const nlohmann::json prompts = {{"classes", c.eval.zero_shot_classes},
                                    {"templates", c.eval.zero_shot_templates},
                                    {"ids", ids}};
    write_file_atomic(fs::path(c.data.shards) / "zero_shot_prompts.json", prompts.dump(1) + "\n");
  }
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& summary = summaries[i];
    if (static_cast<double>(summary.skipped) > c.data.max_bad_fraction * static_cast<double>(summary.samples)) {
      throw DataError("prepare: " + std::to_string(summary.skipped) + " of " + std::to_string(summary.samples) +
                      " samples could not be decoded, more than data.max_bad_fraction = " +
                      std::to_string(c.data.max_bad_fraction) + " allows; the reasons are in " +
                      (fs::path(sources[i].shards) / "bad_samples.jsonl").string() + " (the shards are kept; "
                      "training refuses them until the fraction is raised or the media fixed)");
    }
  }
}
#endif

}  // namespace

void add_data_commands(CLI::App& app) {
  auto e = std::make_shared<EmbedArgs>();
  CLI::App* embed_cmd = app.add_subcommand(
      "embed", "Write per-modality and fused media embeddings of prepared samples (.safetensors or .npy files)");
  embed_cmd->add_option("run", e->run_dir, "Run folder of a multimodal experiment")->required();
  embed_cmd->add_option("--out", e->out, "Output: FILE.safetensors, or a folder of .npy files")->required();
  embed_cmd->add_option("--split", e->split, "Split of the run's data.shards to embed")
      ->check(CLI::IsMember({"train", "val", "test"}))
      ->capture_default_str();
  embed_cmd->add_option("--shards", e->shards, "Embed this shard folder instead of a split");
  embed_cmd->add_option("--checkpoint", e->checkpoint, "Checkpoint file (default: the run's newest)");
  embed_cmd->add_option("--format", e->format, "safetensors or npy (default: from --out's extension)")
      ->check(CLI::IsMember({"safetensors", "npy"}));
  embed_cmd->add_option("--device", e->device, "auto, cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  embed_cmd->add_option("--batch-size", e->batch_size, "Samples per forward pass")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  embed_cmd->callback([e] { embed(*e); });

  auto ab = std::make_shared<std::pair<std::string, std::vector<std::string>>>();
  CLI::App* ablate_cmd = app.add_subcommand(
      "ablate", "Train one run per fusion strategy × missing-modality rate × seed of [ablate]; tabulate retrieval");
  ablate_cmd->add_option("config", ab->first, "Experiment file (TOML) of a multimodal run")->required();
  ablate_cmd->add_option("--set", ab->second, "Override a key (repeatable)");
  ablate_cmd->callback([ab] {
    const auto c = pipelines::load_experiment(ab->first, ab->second);
    const auto result = pipelines::run_ablation(c);
#ifdef LONGNET_WITH_MEDIA
    plot_ablation(result, c);
    log::info("ablate: wrote " + (result.dir / "ablation.png").string());
#else
    log::info("ablate: no plot (ablation.png needs the media build's OpenCV)");
#endif
    std::cout << (result.dir / "ablation.md").string() << "\n";
  });

#ifdef LONGNET_WITH_MEDIA
  auto p = std::make_shared<PrepareArgs>();
  CLI::App* prepare_cmd = app.add_subcommand(
      "prepare", "Decode the media of data.manifest into shards under data.shards, as [prepare] says");
  prepare_cmd->add_option("config", p->config, "Experiment file (TOML)")->required();
  prepare_cmd->add_option("--set", p->sets, "Override a key (repeatable)");
  prepare_cmd->callback([p] { prepare(*p); });
#endif
}

}  // namespace longnet::app
