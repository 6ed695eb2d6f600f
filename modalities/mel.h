// Log-mel spectrogram in plain C++ (FFT through OpenCV's cv::dft), matching librosa's defaults:
//   power spectrogram |STFT|² with a periodic Hann window of win_length samples, zero-padded in the centre of
//   n_fft; frames centred on t·hop (the signal zero-padded by n_fft/2 on both sides, librosa's center=True with
//   pad_mode="constant"), so frames = 1 + samples / hop; Slaney mel scale and Slaney area normalisation
//   (librosa.filters.mel(htk=False, norm="slaney")); then ln(max(mel, log_floor)).
// tools/check_logmel.py compares the result with librosa on a speech clip (the ctest entry media.logmel_vs_librosa).
//
// Usage:
//   LogMel m = log_mel(audio.samples, MelOptions{});     // 80 mels, 25 ms window, 10 ms hop at 16 kHz
//   Patches p = patchify_log_mel(m, 4);                   // 4 frames (40 ms) per patch
#pragma once

#include <span>
#include <vector>

#include "modalities/patchify.h"

namespace longnet::modalities {

struct MelOptions {
  int sample_rate = 16000;
  int n_fft = 400;       // 400 or 512 (any size >= win_length works)
  int win_length = 400;  // 25 ms at 16 kHz
  int hop_length = 160;  // 10 ms at 16 kHz
  int n_mels = 80;
  double f_min = 0.0;
  double f_max = 0.0;  // 0: sample_rate / 2
  bool center = true;
  double log_floor = 1e-10;

  // Throws ConfigError naming the bad field.
  void validate() const;
};

struct LogMel {
  int frames = 0, mels = 0;
  std::vector<float> values;  // frames × mels, row-major
};

// The filterbank, n_mels × (n_fft/2 + 1) row-major, as librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax).
std::vector<double> mel_filterbank(const MelOptions& options);

// Throws DataError when the signal is too short for one frame (center = false) or empty.
LogMel log_mel(std::span<const float> samples, const MelOptions& options);

// Groups of `frames_per_patch` frames; a short last group is padded with ln(log_floor), i.e. silence.
Patches patchify_log_mel(const LogMel& mel, int frames_per_patch, const MelOptions& options = {});

}  // namespace longnet::modalities
