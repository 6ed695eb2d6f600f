// Audio decoding (FFmpeg): the first audio stream of an audio or video file (or bytes in memory), downmixed and
// resampled with libswresample to mono float at `sample_rate` (16 kHz by default). No torch here.
//
// Limits: max_duration_s bounds the returned samples (longer input is a DataError, not a silent cut), timeout_s the
// wall time (also inside FFmpeg's I/O). Failures throw DataError naming the file and the reason (IoError for a
// missing or unreadable file), e.g. "clip.mp4: no audio stream".
//
// Usage:
//   AudioF32 a = decode_audio_file("speech.wav", {});     // 16 kHz mono, values in [-1, 1]
//   LogMel m = log_mel(a.samples, MelOptions{});           // modalities/mel.h
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace longnet::modalities {

struct AudioOptions {
  int sample_rate = 16000;
  double max_duration_s = 3600.0;
  int64_t max_file_bytes = int64_t{1} << 34;  // decode_audio_bytes only
  double timeout_s = 600.0;

  // Throws ConfigError naming the bad field.
  void validate() const;
};

struct AudioF32 {
  int sample_rate = 0;
  std::vector<float> samples;  // mono
  std::string codec;           // of the decoded stream, e.g. "pcm_s16le", "aac"
  int source_sample_rate = 0;
  int source_channels = 0;
};

AudioF32 decode_audio_file(const std::filesystem::path& path, const AudioOptions& options);
AudioF32 decode_audio_bytes(std::span<const uint8_t> bytes, const std::string& name, const AudioOptions& options);

}  // namespace longnet::modalities
