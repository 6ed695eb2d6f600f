// Video decoding (FFmpeg): demux, threaded decode, frame sampling and conversion to RGB at a target size (libswscale),
// from a file or from bytes in memory. No torch here.
//
// Sampling (VideoOptions::sampling), times relative to the stream start:
//   all      every decoded frame
//   fps      the frames showing t = 0, 1/fps, 2/fps, ... (t < duration)
//   uniform  the frames showing t = (i + 0.5)·duration/num_frames, i = 0..num_frames-1
// Clips (fps and uniform): with clip_seconds = S > 0 (at most the duration D), sampling covers the window
// [a, a + S) instead of the whole stream: a = (D - S)/2 for one clip; of `clips` = K windows spread evenly from the
// start to the end (a_k = k·(D - S)/(K - 1)), `clip` picks one. clip_seconds = 0 with K > 1 cuts the stream into K
// consecutive windows of D/K.
// "The frame showing t" is the first frame whose display interval [pts, pts + duration) ends after t. When the next
// target lies beyond the next keyframe, the decoder seeks to the keyframe before it (av_seek_frame, backward) and
// decodes forward instead of decoding everything in between; frames before the target that no other frame refers
// to are dropped by the decoder unseen (skip_nonref). Both give the same frames as decoding everything.
//
// Limits: frame sides (max_side), the returned bytes (max_output_bytes), the bytes the decoder produces in total
// (max_decoded_bytes) and wall time (timeout_s, also enforced inside FFmpeg's I/O through the interrupt callback).
// Opening an input also caps every single FFmpeg allocation at 256 MiB for the whole process (av_max_alloc): FFmpeg's
// demuxers size tables from header fields while parsing, where no callback can stop them.
// Failures throw DataError naming the file and the reason (IoError for a missing or unreadable file).
//
// Usage:
//   VideoOptions opt{.sampling = FrameSampling::uniform, .num_frames = 8, .height = 224, .width = 224};
//   VideoFrames v = decode_video_file("clip.mp4", opt);             // 8 × 224 × 224 × 3 RGB
//   Patches p = patchify_video(v, ImageOptions{}.mean, ImageOptions{}.std, 16, 2);  // tubelets of 2 frames
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "modalities/image.h"
#include "modalities/patchify.h"

namespace longnet::modalities {

enum class FrameSampling { all, fps, uniform };

// "all" | "fps" | "uniform"; throws ConfigError otherwise.
FrameSampling parse_frame_sampling(std::string_view name);

struct VideoOptions {
  FrameSampling sampling = FrameSampling::uniform;
  double fps = 1.0;    // FrameSampling::fps
  int num_frames = 8;  // FrameSampling::uniform
  double clip_seconds = 0.0;  // window length; 0: the whole stream (one clip) or D/clips
  int clips = 1;              // windows spread over the stream
  int clip = 0;               // the window sampled, in [0, clips)
  ResizePolicy resize = ResizePolicy::exact;
  int height = 224, width = 224;  // output size (ResizePolicy::none: the first frame's size)
  int threads = 0;                // decoder threads; 0 lets FFmpeg choose (one per core)
  bool seek = true;               // seek to the keyframe before a far target instead of decoding up to it
  double seek_gap_s = 2.0;        // containers without a keyframe index: seek when the target is this far ahead
  bool skip_nonref = true;        // drop unreferenced frames that end before the next target without decoding them
  int max_side = 8192;
  int64_t max_output_bytes = int64_t{1} << 31;
  int64_t max_decoded_bytes = int64_t{1} << 37;
  int64_t max_file_bytes = int64_t{1} << 34;  // decode_video_bytes only
  double timeout_s = 600.0;

  // Throws ConfigError naming the bad field.
  void validate() const;
};

// Stream facts, known after opening.
struct VideoInfo {
  int width = 0, height = 0;
  double duration_s = 0.0;  // 0 when the container does not say
  double frame_rate = 0.0;
  std::string codec;
};

// What the decoder did (for tests and the benchmark).
struct VideoDecodeStats {
  int64_t packets_sent = 0;     // packets given to the decoder
  int64_t frames_decoded = 0;   // frames that came out of it
  int64_t frames_returned = 0;  // sampled frames passed on
  int64_t seeks = 0;
};

// T frames of height × width × 3 RGB, frames[t] at pixels[t·H·W·3 ...].
struct VideoFrames {
  int frames = 0, height = 0, width = 0;
  std::vector<uint8_t> pixels;
  std::vector<double> timestamps_s;  // presentation time of each returned frame, relative to the stream start
  VideoInfo info;
  VideoDecodeStats stats;
};

// One converted frame; `rgb` (height × width × 3) is valid during the callback only.
struct FrameView {
  int64_t index = 0;  // among the returned frames
  double timestamp_s = 0.0;
  int height = 0, width = 0;
  const uint8_t* rgb = nullptr;
};
using FrameCallback = std::function<void(const FrameView&)>;

VideoFrames decode_video_file(const std::filesystem::path& path, const VideoOptions& options);
VideoFrames decode_video_bytes(std::span<const uint8_t> bytes, const std::string& name, const VideoOptions& options);

// Streaming form: nothing is kept, each sampled frame goes to `on_frame` as soon as it is converted.
VideoDecodeStats for_each_video_frame(const std::filesystem::path& path, const VideoOptions& options,
                                      const FrameCallback& on_frame, VideoInfo* info = nullptr);

// Normalised frames (as normalize_image, per frame) cut into patches or tubelets of `tubelet` frames.
Patches patchify_video(const VideoFrames& video, const std::array<float, 3>& mean, const std::array<float, 3>& std,
                       int patch, int tubelet);

}  // namespace longnet::modalities
