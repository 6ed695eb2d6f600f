#include "pipelines/prepare.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "modalities/patchify.h"
#include "modalities/tokenizer.h"
#include "pipelines/manifest.h"
#include "pipelines/shards.h"

namespace longnet::pipelines {
namespace {

using nlohmann::json;

at::Tensor patch_values(const modalities::Patches& p) {
  return torch::from_blob(const_cast<float*>(p.values.data()), {p.count, p.dim}, torch::kFloat).to(torch::kHalf);
}

at::Tensor patch_positions(const modalities::Patches& p) {
  return torch::from_blob(const_cast<int64_t*>(p.positions.data()), {p.count, 3}, torch::kLong).to(torch::kInt);
}

struct Prepared {
  SampleTensors fields;
  std::string error;  // non-empty: the sample is bad
  AudioFitted audio = AudioFitted::unchanged;
};

// Decodes one sample; any decoder error makes the whole sample bad, with the modality named.
Prepared prepare_sample(const ManifestSample& s, const PrepareOptions& o, const text::Tokenizer* tokenizer) {
  Prepared out;
  const char* stage = "";
  try {
    if (!s.text.empty()) {
      stage = "text";
      auto ids = tokenizer->encode(s.text.front(), /*add_bos=*/true, /*add_eos=*/true);
      if (static_cast<int64_t>(ids.size()) > o.text_max_tokens) {
        ids.resize(static_cast<size_t>(o.text_max_tokens));
        ids.back() = tokenizer->eos_id();
      }
      out.fields.emplace_back("text_ids", torch::tensor(std::vector<int32_t>(ids.begin(), ids.end()), torch::kInt));
      if (s.text.size() > 1) {  // every caption, for retrieval with several captions per item
        std::vector<int32_t> all, offsets{0};
        for (const auto& caption : s.text) {
          auto c = tokenizer->encode(caption, /*add_bos=*/true, /*add_eos=*/true);
          if (static_cast<int64_t>(c.size()) > o.text_max_tokens) {
            c.resize(static_cast<size_t>(o.text_max_tokens));
            c.back() = tokenizer->eos_id();
          }
          all.insert(all.end(), c.begin(), c.end());
          offsets.push_back(static_cast<int32_t>(all.size()));
        }
        out.fields.emplace_back("captions_ids", torch::tensor(all, torch::kInt));
        out.fields.emplace_back("captions_offsets", torch::tensor(offsets, torch::kInt));
      }
      std::string joined;
      for (const auto& caption : s.text) joined += (joined.empty() ? "" : "\n") + caption;
      out.fields.emplace_back("captions", torch::from_blob(joined.data(), {static_cast<int64_t>(joined.size())},
                                                           torch::kUInt8).clone());
    }
    if (s.label_index && *s.label_index >= 0 &&
        (o.classes.empty() || *s.label_index < static_cast<int64_t>(o.classes.size()))) {
      out.fields.emplace_back("label", torch::tensor({*s.label_index}, torch::kLong));
    } else if (s.label_name) {
      const auto it = std::find(o.classes.begin(), o.classes.end(), *s.label_name);
      if (it != o.classes.end()) {
        out.fields.emplace_back("label", torch::tensor({static_cast<int64_t>(it - o.classes.begin())}, torch::kLong));
      }
    }
    if (s.image) {
      stage = "image";
      const auto patches = modalities::patchify_image(modalities::load_image(*s.image, o.image), o.image_patch);
      out.fields.emplace_back("image_patches", patch_values(patches));
      out.fields.emplace_back("image_positions", patch_positions(patches));
    }
    if (s.video) {
      stage = "video";
      modalities::VideoOptions video = o.video;
      video.clips = s.split == Split::train ? o.train_clips : o.eval_clips;
      for (video.clip = 0; video.clip < video.clips; ++video.clip) {
        const auto frames = modalities::decode_video_file(*s.video, video);
        const auto patches = modalities::patchify_video(frames, o.image.mean, o.image.std, o.video_patch,
                                                        o.video_tubelet);
        const std::string suffix = video.clip == 0 ? "" : "_clip" + std::to_string(video.clip);
        out.fields.emplace_back("video_patches" + suffix, patch_values(patches));
        out.fields.emplace_back("video_positions" + suffix, patch_positions(patches));
      }
    }
    if (s.audio) {
      stage = "audio";
      auto audio = modalities::decode_audio_file(*s.audio, o.audio);
      const auto limit = static_cast<size_t>(o.audio_max_seconds * audio.sample_rate);
      if (audio.samples.size() > limit) audio.samples.resize(limit);
      if (o.audio_seconds > 0) {
        out.audio = fit_audio(audio.samples, static_cast<size_t>(o.audio_seconds * audio.sample_rate), o.audio_fit);
      }
      const auto mel = modalities::log_mel(audio.samples, o.mel);
      const auto patches = modalities::patchify_log_mel(mel, o.mel_frames_per_patch, o.mel);
      out.fields.emplace_back("audio_patches", patch_values(patches));
      out.fields.emplace_back("audio_positions", patch_positions(patches));
    }
  } catch (const Error& e) {
    out.error = std::string(stage) + ": " + format_error_chain(e);
  } catch (const std::exception& e) {
    out.error = std::string(stage) + ": " + e.what();
  }
  return out;
}

// One status line on stderr, rewritten in place on a terminal, every 10 % otherwise.
class Progress {
 public:
  Progress(int64_t total, bool enabled) : total_(total), enabled_(enabled), tty_(::isatty(2) == 1) {}
  void update(int64_t done, int64_t bad) {
    if (!enabled_ || total_ == 0) return;
    const auto now = std::chrono::steady_clock::now();
    const int64_t decile = done * 10 / total_;
    const bool due = tty_ ? now - last_ > std::chrono::milliseconds(200) || done == total_ : decile != last_decile_;
    if (!due) return;
    last_ = now;
    last_decile_ = decile;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0.0;
    const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0.0;
    const int width = 30;
    const auto filled = static_cast<int>(width * done / total_);
    std::fprintf(stderr, "%sprepare [%.*s%*s] %lld/%lld samples, %lld bad, %.1f/s, ETA %.0f s%s",
                 tty_ ? "\r" : "", filled, "==============================", width - filled, "",
                 static_cast<long long>(done), static_cast<long long>(total_), static_cast<long long>(bad), rate, eta,
                 tty_ && done < total_ ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  int64_t total_;
  bool enabled_, tty_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now(), last_{};
  int64_t last_decile_ = -1;
};

}  // namespace

AudioFitted fit_audio(std::vector<float>& samples, size_t target, const std::string& fit) {
  if (fit != "crop" && fit != "pad" && fit != "loop") {
    throw ConfigError("prepare: audio_fit must be \"crop\", \"pad\" or \"loop\", got \"" + fit + "\"");
  }
  if (samples.size() > target) {
    samples.resize(target);
    return AudioFitted::cropped;
  }
  if (samples.size() == target || fit == "crop") return AudioFitted::unchanged;
  if (fit == "loop" && !samples.empty()) {
    const size_t n = samples.size();
    samples.resize(target);
    for (size_t i = n; i < target; ++i) samples[i] = samples[i - n];
    return AudioFitted::looped;
  }
  samples.resize(target, 0.0F);  // silence (also for "loop" of an empty clip)
  return AudioFitted::padded;
}

void PrepareOptions::validate() const {
  auto fail = [](const std::string& message) { throw ConfigError("prepare: " + message); };
  if (manifest.empty()) fail("a manifest is required");
  if (output.empty()) fail("an output folder is required");
  if (text_max_tokens < 2) fail("text_max_tokens must be >= 2 (BOS and EOS), got " + std::to_string(text_max_tokens));
  if (image_patch < 1 || video_patch < 1 || video_tubelet < 1 || mel_frames_per_patch < 1) {
    fail("patch sizes (image_patch, video_patch, video_tubelet, mel_frames_per_patch) must be >= 1");
  }
  if (!(audio_max_seconds > 0)) fail("audio_max_seconds must be > 0");
  if (eval_clips < 1 || train_clips < 1) fail("eval_clips and train_clips must be >= 1");
  if (!(audio_seconds >= 0) || audio_seconds > audio_max_seconds) {
    fail("audio_seconds must be in [0, audio_max_seconds], got " + std::to_string(audio_seconds));
  }
  if (audio_fit != "crop" && audio_fit != "pad" && audio_fit != "loop") {
    fail("audio_fit must be \"crop\", \"pad\" or \"loop\", got \"" + audio_fit + "\"");
  }
  if (workers < 0) fail("workers must be >= 0");
  if (on_bad != "skip" && on_bad != "fail") fail("on_bad must be \"skip\" or \"fail\", got \"" + on_bad + "\"");
  if (max_shard_bytes < 1) fail("max_shard_bytes must be >= 1");
  image.validate();
  video.validate();
  audio.validate();
  mel.validate();
  if (mel.sample_rate != audio.sample_rate) {
    fail("mel.sample_rate (" + std::to_string(mel.sample_rate) + ") must equal audio.sample_rate (" +
         std::to_string(audio.sample_rate) + ")");
  }
}

PrepareSummary prepare_dataset(const PrepareOptions& options) {
  options.validate();
  const auto t0 = std::chrono::steady_clock::now();
  // Missing files are bad samples to report, not a reason to reject the whole manifest.
  const Manifest manifest = Manifest::load(options.manifest, {.check_files = false});
  std::optional<text::Tokenizer> tokenizer;
  const bool any_text = std::any_of(manifest.samples().begin(), manifest.samples().end(),
                                    [](const ManifestSample& s) { return !s.text.empty(); });
  if (any_text) {
    if (options.tokenizer.empty()) {
      throw ConfigError("prepare: " + options.manifest.string() +
                        " has captions, so a tokenizer model is needed (train one with `longnet tokenizer train`)");
    }
    tokenizer = text::Tokenizer::load(options.tokenizer);
  }

  PrepareSummary summary;
  summary.samples = static_cast<int64_t>(manifest.samples().size());
  const unsigned hardware = std::max(1U, std::thread::hardware_concurrency());
  const auto workers = static_cast<size_t>(options.workers > 0 ? options.workers : static_cast<int>(hardware));
  // Decoders use their own threads too; one intra-op torch thread per worker keeps the machine from oversubscribing.
  at::set_num_threads(1);

  std::map<Split, std::unique_ptr<ShardWriter>> writers;
  for (const Split split : {Split::train, Split::val, Split::test}) {
    if (!manifest.split(split).empty()) {
      writers[split] = std::make_unique<ShardWriter>(options.output / std::string(split_name(split)),
                                                     ShardWriterOptions{.max_shard_bytes = options.max_shard_bytes});
    }
  }
  std::vector<const ManifestSample*> todo;
  for (const auto& s : manifest.samples()) {
    if (writers.at(s.split)->contains(s.id)) {
      ++summary.kept;
    } else {
      todo.push_back(&s);
    }
  }
  log::info("prepare: " + std::to_string(summary.samples) + " samples in " + options.manifest.string() + ", " +
            std::to_string(summary.kept) + " already prepared, " + std::to_string(workers) + " workers");

  std::string bad_log;
  Progress progress(static_cast<int64_t>(todo.size()), options.progress);
  // Workers take samples in manifest order; results are written in that order, so shards do not depend on timing.
  std::atomic<size_t> next{0};
  std::vector<std::promise<Prepared>> promises(todo.size());
  std::vector<std::future<Prepared>> results;
  results.reserve(todo.size());
  for (auto& p : promises) results.push_back(p.get_future());
  std::atomic<bool> cancel{false};
  std::vector<std::thread> threads;
  for (size_t w = 0; w < std::min(workers, todo.size()); ++w) {
    threads.emplace_back([&] {
      for (size_t i = next++; i < todo.size() && !cancel; i = next++) {
        promises[i].set_value(prepare_sample(*todo[i], options, tokenizer ? &*tokenizer : nullptr));
      }
    });
  }
  auto finish_threads = [&] {
    cancel = true;
    for (auto& t : threads) t.join();
  };
  try {
    for (size_t i = 0; i < todo.size(); ++i) {
      Prepared p = results[i].get();
      const ManifestSample& s = *todo[i];
      if (!p.error.empty()) {
        const std::string where = options.manifest.string() + ":" + std::to_string(s.line);
        if (options.on_bad == "fail") {
          throw DataError(where + ": sample '" + s.id + "': " + p.error +
                          " (prepare.on_bad = \"fail\"; the shards written so far are kept and a rerun resumes)");
        }
        log::warn("prepare: skipping sample '" + s.id + "' (" + where + "): " + p.error);
        bad_log += json{{"id", s.id}, {"line", s.line}, {"reason", p.error}}.dump() + "\n";
        summary.bad.emplace_back(s.id, p.error);
        ++summary.skipped;
      } else {
        writers.at(s.split)->add(s.id, p.fields);
        ++summary.prepared;
        summary.audio_cropped += p.audio == AudioFitted::cropped ? 1 : 0;
        summary.audio_padded += p.audio == AudioFitted::padded ? 1 : 0;
        summary.audio_looped += p.audio == AudioFitted::looped ? 1 : 0;
      }
      progress.update(static_cast<int64_t>(i + 1), summary.skipped);
    }
  } catch (...) {
    finish_threads();
    throw;
  }
  finish_threads();
  for (auto& [split, writer] : writers) writer->finish();

  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json splits = json::object();
  for (const auto& [split, writer] : writers) splits[std::string(split_name(split))] = writer->samples();
  write_file_atomic(options.output / "bad_samples.jsonl", bad_log);
  write_file_atomic(options.output / "prepare_summary.json",
                    json{{"manifest", options.manifest.string()},
                         {"samples", summary.samples},
                         {"prepared", summary.prepared},
                         {"kept_from_earlier_run", summary.kept},
                         {"skipped_bad", summary.skipped},
                         {"samples_per_split", splits},
                         {"audio_seconds", options.audio_seconds},
                         {"video_clip_seconds", options.video.clip_seconds},
                         {"eval_clips", options.eval_clips},
                         {"train_clips", options.train_clips},
                         {"audio_fit", options.audio_fit},
                         {"audio_cropped", summary.audio_cropped},
                         {"audio_padded", summary.audio_padded},
                         {"audio_looped", summary.audio_looped},
                         {"seconds", summary.seconds}}
                            .dump(2) + "\n");
  log::info("prepare: " + std::to_string(summary.prepared) + " prepared, " + std::to_string(summary.kept) +
            " kept, " + std::to_string(summary.skipped) + " skipped as bad, in " +
            std::to_string(static_cast<int>(summary.seconds)) + " s → " + options.output.string());
  return summary;
}

}  // namespace longnet::pipelines
