#include "modalities/mel.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <utility>

#include <opencv2/core.hpp>

#include "core/error.h"

namespace longnet::modalities {
namespace {

// Slaney's auditory-toolbox scale (librosa hz_to_mel with htk=False): linear below 1 kHz, logarithmic above.
constexpr double kSpacing = 200.0 / 3.0;
constexpr double kMinLogHz = 1000.0;
constexpr double kMinLogMel = kMinLogHz / kSpacing;

double log_step() { return std::log(6.4) / 27.0; }

double hz_to_mel(double hz) {
  return hz < kMinLogHz ? hz / kSpacing : kMinLogMel + std::log(hz / kMinLogHz) / log_step();
}

double mel_to_hz(double mel) {
  return mel < kMinLogMel ? mel * kSpacing : kMinLogHz * std::exp(log_step() * (mel - kMinLogMel));
}

}  // namespace

void MelOptions::validate() const {
  auto bad = [](const std::string& what) { throw ConfigError("mel options: " + what); };
  if (sample_rate <= 0) bad("sample_rate must be positive");
  if (win_length <= 0 || n_fft < win_length) bad("need 0 < win_length <= n_fft");
  if (n_fft > (1 << 16)) bad("n_fft must be at most 65536");
  if (hop_length <= 0) bad("hop_length must be positive");
  if (n_mels <= 0 || n_mels > 1024) bad("n_mels must be in 1..1024");
  const double top = f_max > 0.0 ? f_max : sample_rate / 2.0;
  if (f_min < 0.0 || top <= f_min || top > sample_rate / 2.0) bad("need 0 <= f_min < f_max <= sample_rate / 2");
  if (!(log_floor > 0.0)) bad("log_floor must be positive");
}

std::vector<double> mel_filterbank(const MelOptions& o) {
  o.validate();
  const int bins = o.n_fft / 2 + 1;
  const double top = o.f_max > 0.0 ? o.f_max : o.sample_rate / 2.0;
  // n_mels + 2 band edges equally spaced on the mel scale.
  std::vector<double> edges(static_cast<size_t>(o.n_mels) + 2);
  const double lo = hz_to_mel(o.f_min), hi = hz_to_mel(top);
  for (size_t i = 0; i < edges.size(); ++i) {
    edges[i] = mel_to_hz(lo + (hi - lo) * static_cast<double>(i) / static_cast<double>(edges.size() - 1));
  }
  std::vector<double> w(static_cast<size_t>(o.n_mels) * bins, 0.0);
  for (int m = 0; m < o.n_mels; ++m) {
    const double left = edges[m], centre = edges[m + 1], right = edges[m + 2];
    const double norm = 2.0 / (right - left);  // Slaney: every triangle has unit area
    for (int k = 0; k < bins; ++k) {
      const double f = static_cast<double>(k) * o.sample_rate / o.n_fft;
      const double up = (f - left) / (centre - left), down = (right - f) / (right - centre);
      w[static_cast<size_t>(m) * bins + k] = std::max(0.0, std::min(up, down)) * norm;
    }
  }
  return w;
}

LogMel log_mel(std::span<const float> samples, const MelOptions& o) {
  o.validate();
  if (samples.empty()) throw DataError("log_mel: empty signal");
  const int64_t n = static_cast<int64_t>(samples.size());
  const int64_t pad = o.center ? o.n_fft / 2 : 0;
  if (n + 2 * pad < o.n_fft) {
    throw DataError("log_mel: " + std::to_string(n) + " samples are fewer than one window of " +
                    std::to_string(o.n_fft));
  }
  const int64_t frames = 1 + (n + 2 * pad - o.n_fft) / o.hop_length;
  if (frames > (int64_t{1} << 26)) throw DataError("log_mel: signal too long (" + std::to_string(n) + " samples)");
  const int bins = o.n_fft / 2 + 1;

  // Periodic Hann of win_length, centred in n_fft (scipy.signal.get_window("hann", N, fftbins=True)).
  std::vector<double> window(static_cast<size_t>(o.n_fft), 0.0);
  const int offset = (o.n_fft - o.win_length) / 2;
  for (int i = 0; i < o.win_length; ++i) {
    window[static_cast<size_t>(offset + i)] = 0.5 - 0.5 * std::cos(2.0 * std::numbers::pi * i / o.win_length);
  }
  const std::vector<double> fb = mel_filterbank(o);
  // Each triangle covers a few bins only: keep its non-zero range, the product below skips the zeros.
  std::vector<std::pair<int, int>> support(static_cast<size_t>(o.n_mels), {0, 0});
  for (int m = 0; m < o.n_mels; ++m) {
    const double* wrow = fb.data() + static_cast<size_t>(m) * bins;
    int lo = 0, hi = bins;
    while (lo < bins && wrow[lo] == 0.0) ++lo;
    while (hi > lo && wrow[hi - 1] == 0.0) --hi;
    support[static_cast<size_t>(m)] = {lo, hi};
  }

  LogMel out{static_cast<int>(frames), o.n_mels, std::vector<float>(static_cast<size_t>(frames) * o.n_mels)};
  // Blocks of frames through one row-wise DFT call each (double precision: the log of small powers is sensitive).
  constexpr int64_t kBlock = 256;
  cv::Mat block, spectrum;
  std::vector<double> power(static_cast<size_t>(bins));
  for (int64_t b0 = 0; b0 < frames; b0 += kBlock) {
    const int rows = static_cast<int>(std::min(kBlock, frames - b0));
    block.create(rows, o.n_fft, CV_64F);
    for (int r = 0; r < rows; ++r) {
      auto* row = block.ptr<double>(r);
      const int64_t start = (b0 + r) * o.hop_length - pad;
      for (int i = 0; i < o.n_fft; ++i) {
        const int64_t s = start + i;
        row[i] = (s >= 0 && s < n) ? static_cast<double>(samples[static_cast<size_t>(s)]) * window[i] : 0.0;
      }
    }
    cv::dft(block, spectrum, cv::DFT_ROWS);  // real input: CCS-packed rows
    for (int r = 0; r < rows; ++r) {
      const auto* z = spectrum.ptr<double>(r);
      // CCS: [Re0, Re1, Im1, ..., Re(N/2 - 1), Im(N/2 - 1), Re(N/2)] for even N; odd N ends with Re, Im.
      power[0] = z[0] * z[0];
      for (int k = 1; k < bins; ++k) {
        const int at = 2 * k - 1;
        const double re = z[at];
        const double im = (o.n_fft % 2 == 0 && k == bins - 1) ? 0.0 : z[at + 1];
        power[k] = re * re + im * im;
      }
      float* dst = out.values.data() + (b0 + r) * o.n_mels;
      for (int m = 0; m < o.n_mels; ++m) {
        const double* wrow = fb.data() + static_cast<size_t>(m) * bins;
        double acc = 0.0;
        const auto [lo, hi] = support[static_cast<size_t>(m)];
        for (int k = lo; k < hi; ++k) acc += wrow[k] * power[k];
        dst[m] = static_cast<float>(std::log(std::max(acc, o.log_floor)));
      }
    }
  }
  return out;
}

Patches patchify_log_mel(const LogMel& mel, int frames_per_patch, const MelOptions& options) {
  if (mel.values.size() != static_cast<size_t>(mel.frames) * mel.mels) {
    throw DataError("patchify_log_mel: values do not match frames × mels");
  }
  return patchify_mel(mel.values.data(), mel.frames, mel.mels, frames_per_patch,
                      static_cast<float>(std::log(options.log_floor)));
}

}  // namespace longnet::modalities
