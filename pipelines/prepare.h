// `longnet prepare`: a manifest's media and captions → tensor shards that training reads (pipelines/shards.h), one
// shard folder per split (<output>/train, <output>/val, <output>/test). Runs where the media libraries are
// (LONGNET_MEDIA); GPU machines only read the result.
//
// Per sample, in parallel over `workers` threads, the fields pipelines/loader.h documents:
//   text   the first caption → SentencePiece ids (int32, BOS/EOS added, at most text_max_tokens)
//   image  decode + resize/crop + normalise → P×P patches (float16) and positions (int32 (N, 3))
//   video  frames sampled with seeking → patches or tubelets (float16) and positions
//   audio  the manifest's `audio` file (which may be the video itself) → 16 kHz mono → log-mel → patches of k frames
//   label  the manifest's class label as an index (see PrepareOptions::classes), when it has one
//   captions_ids, captions_offsets   with several captions: all of them tokenised, concatenated (int32), and the
//          offsets of each (int32, captions + 1), for retrieval evaluation with several captions per item
// Every caption is kept in the shard as well (`captions`, the UTF-8 bytes of all captions joined by '\n', uint8), for
// retrieval evaluation with several captions per item.
//
// Bad samples: a sample whose media fail to decode (missing, unreadable, corrupt, truncated, no such stream, ...) is
// skipped whole; its id and the decoder's error go to <output>/bad_samples.jsonl and the log, and are counted in
// <output>/prepare_summary.json. With on_bad = fail the first one stops the run instead (exit 1; the shards written
// so far stay and a rerun resumes). Original files are never modified.
//
// Resuming: an interrupted run leaves complete shards and a partial index; running again skips the samples already
// stored and prepares the rest.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "modalities/audio.h"
#include "modalities/image.h"
#include "modalities/mel.h"
#include "modalities/video.h"

namespace longnet::pipelines {

struct PrepareOptions {
  std::filesystem::path manifest;
  std::filesystem::path output;     // shard folders and the summary go here
  std::filesystem::path tokenizer;  // SentencePiece model; required when a sample has text
  int64_t text_max_tokens = 256;
  // Class names for the manifest's `label`: a sample's label (an index below classes.size(), or one of the names) is
  // stored as the field `label` (int64, one value); with no classes, integer labels are stored as they are.
  std::vector<std::string> classes;

  modalities::ImageOptions image{.height = 224, .width = 224};
  int image_patch = 16;
  modalities::VideoOptions video{};  // frames of video.clip_seconds windows (0: the whole video)
  // Clips per video, spread over it (one: the centred window): clip 0 as video_patches / video_positions, clip k as
  // video_patches_clip<k> / video_positions_clip<k>. Evaluation embeds each clip of a held-out (val, test) sample
  // and averages (pipelines/multimodal_run.h); training takes one clip of a train sample per epoch
  // (LoaderOptions::sample_video_clips).
  int eval_clips = 1;
  int train_clips = 1;
  int video_patch = 16;
  int video_tubelet = 1;
  modalities::AudioOptions audio{};
  modalities::MelOptions mel{};
  int mel_frames_per_patch = 16;
  double audio_max_seconds = 30.0;  // longer audio is cut
  // A fixed audio length (0: each clip keeps its own, up to audio_max_seconds): longer clips are cut to it; shorter ones
  // are padded with silence ("pad"), repeated ("loop"), or left short ("crop"). prepare_summary.json counts each case.
  double audio_seconds = 0.0;
  std::string audio_fit = "pad";

  int workers = 0;                   // 0: one per hardware thread
  std::string on_bad = "skip";       // "skip" | "fail"
  int64_t max_shard_bytes = int64_t{256} << 20;
  bool progress = true;              // a progress line on stderr

  // ConfigError naming the field.
  void validate() const;
};

// What AudioFit did to one clip.
enum class AudioFitted { unchanged, cropped, padded, looped };
// Fits `samples` to `target` samples by the rule of PrepareOptions::audio_fit ("crop" | "pad" | "loop").
AudioFitted fit_audio(std::vector<float>& samples, size_t target, const std::string& fit);

struct PrepareSummary {
  int64_t samples = 0;   // in the manifest
  int64_t prepared = 0;  // written by this run
  int64_t kept = 0;      // already stored by an earlier run
  int64_t skipped = 0;   // bad samples
  int64_t audio_cropped = 0, audio_padded = 0, audio_looped = 0;  // clips fitted to audio_seconds
  std::vector<std::pair<std::string, std::string>> bad;  // (id, reason)
  double seconds = 0;
};

PrepareSummary prepare_dataset(const PrepareOptions& options);

}  // namespace longnet::pipelines
