#include <cmath>
#include <numbers>
#include <vector>

#include "core/error.h"
#include "modalities/mel.h"

#include <catch2/catch.hpp>

using namespace longnet::modalities;

namespace {

// 0.5·sin(2π·1000·t) at 16 kHz, stored as float like decoded audio.
std::vector<float> tone(int samples) {
  std::vector<float> y(static_cast<size_t>(samples));
  for (int i = 0; i < samples; ++i) y[i] = static_cast<float>(0.5 * std::sin(2.0 * std::numbers::pi * 1000.0 * i / 16000.0));
  return y;
}

float at(const LogMel& m, int frame, int mel) { return m.values[static_cast<size_t>(frame) * m.mels + mel]; }

}  // namespace

// Reference values below come from librosa 0.11: librosa.filters.mel(sr=16000, n_fft, n_mels=80) and
// np.log(np.maximum(librosa.feature.melspectrogram(y, sr=16000, n_fft, hop_length=160, win_length=400), 1e-10)).

TEST_CASE("mel: Slaney filterbank equals librosa's", "[mel]") {
  const std::vector<double> fb = mel_filterbank({});
  REQUIRE(fb.size() == 80u * 201u);
  CHECK(fb[0 * 201 + 1] == Approx(0.024862593984176087).epsilon(1e-9));
  CHECK(fb[10 * 201 + 10] == Approx(0.019908218880980696).epsilon(1e-9));
  CHECK(fb[40 * 201 + 43] == Approx(0.01473556574143909).epsilon(1e-9));
  CHECK(fb[79 * 201 + 192] == Approx(0.003164711739176461).epsilon(1e-9));
  CHECK(fb[0 * 201 + 0] == 0.0);
  MelOptions o512;
  o512.n_fft = 512;
  CHECK(mel_filterbank(o512)[30 * 257 + 38] == Approx(0.015007369012917738).epsilon(1e-9));
}

TEST_CASE("mel: log-mel of a 1 kHz tone equals librosa's", "[mel]") {
  const std::vector<float> y = tone(8000);
  const LogMel m = log_mel(y, {});
  REQUIRE(m.frames == 51);  // 1 + 8000 / 160 with centred frames
  REQUIRE(m.mels == 80);
  CHECK(at(m, 25, 26) == Approx(4.049341439495221).margin(1e-4));
  CHECK(at(m, 0, 40) == Approx(-4.4300938162309285).margin(1e-4));  // the onset at the zero padding
  CHECK(at(m, 50, 60) == Approx(-7.9582869590159975).margin(1e-4));
  CHECK(at(m, 50, 25) == Approx(2.4231612091317567).margin(1e-4));
  CHECK(at(m, 25, 10) == Approx(std::log(1e-10)).margin(1e-4));  // far from the tone: the floor

  MelOptions o512;
  o512.n_fft = 512;
  const LogMel m512 = log_mel(y, o512);
  REQUIRE(m512.frames == 51);
  CHECK(at(m512, 25, 26) == Approx(4.185243450845274).margin(1e-4));
  CHECK(at(m512, 0, 40) == Approx(-4.251681042089326).margin(1e-4));
  CHECK(at(m512, 50, 25) == Approx(2.809506747229834).margin(1e-4));
}

TEST_CASE("mel: frame counts, silence and options", "[mel]") {
  const LogMel silence = log_mel(std::vector<float>(16000, 0.0F), {});
  CHECK(silence.frames == 101);
  for (float v : silence.values) REQUIRE(v == Approx(std::log(1e-10)));

  MelOptions uncentred;
  uncentred.center = false;
  CHECK(log_mel(tone(1000), uncentred).frames == 1 + (1000 - 400) / 160);
  CHECK_THROWS_AS(log_mel(tone(100), uncentred), longnet::DataError);
  CHECK_THROWS_AS(log_mel(std::vector<float>{}, {}), longnet::DataError);

  MelOptions bad;
  bad.n_fft = 256;  // shorter than the 400-sample window
  CHECK_THROWS_AS(log_mel(tone(1000), bad), longnet::ConfigError);
  bad = {};
  bad.f_max = 9000.0;
  CHECK_THROWS_AS(mel_filterbank(bad), longnet::ConfigError);
}

TEST_CASE("mel: patches of k frames, the last one padded with silence", "[mel][patchify]") {
  const LogMel m = log_mel(tone(8000), {});  // 51 frames
  const Patches p = patchify_log_mel(m, 4);
  CHECK(p.count == 13);
  CHECK(p.dim == 4 * 80);
  CHECK(p.grid == std::array<int64_t, 3>{13, 1, 1});
  REQUIRE(p.values.size() == 13u * 320u);
  CHECK(std::vector<int64_t>(p.positions.begin() + 3 * 5, p.positions.begin() + 3 * 6) == std::vector<int64_t>{5, 0, 0});
  // Patch 6 holds frames 24..27 in order.
  CHECK(p.values[6 * 320 + 1 * 80 + 26] == at(m, 25, 26));
  // Frame 51 (the first padded one) is silence.
  CHECK(p.values[12 * 320 + 3 * 80 + 26] == Approx(std::log(1e-10)));
  CHECK(p.values[12 * 320 + 2 * 80 + 26] == at(m, 50, 26));
  CHECK_THROWS_AS(patchify_log_mel(m, 0), longnet::ConfigError);
}
