#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "core/error.h"
#include "modalities/audio.h"
#include "tests/modalities/media_fixtures.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

using namespace longnet::modalities;
using longnet::test::lavfi;
using longnet::test::TempDir;

namespace {

double rms(const std::vector<float>& x, size_t from, size_t to) {
  double s = 0.0;
  for (size_t i = from; i < to; ++i) s += static_cast<double>(x[i]) * x[i];
  return std::sqrt(s / static_cast<double>(to - from));
}

// Frequency from upward zero crossings over the middle of the signal.
double frequency(const std::vector<float>& x, int rate) {
  const size_t from = x.size() / 4, to = 3 * x.size() / 4;
  size_t first = 0, last = 0, crossings = 0;
  for (size_t i = from + 1; i < to; ++i) {
    if (x[i - 1] < 0.0F && x[i] >= 0.0F) {
      if (crossings == 0) first = i;
      last = i;
      ++crossings;
    }
  }
  return static_cast<double>(crossings - 1) * rate / static_cast<double>(last - first);
}

}  // namespace

TEST_CASE("audio: 44.1 kHz stereo wav is resampled to 16 kHz mono", "[audio]") {
  TempDir dir;
  // sine: amplitude 1/8; the same tone in both channels, so the mono mix keeps it.
  const auto wav = lavfi(dir.path() / "s.wav", "sine=frequency=440:sample_rate=44100:duration=2",
                         "-ac 2 -c:a pcm_s16le");
  const AudioF32 a = decode_audio_file(wav, {});
  CHECK(a.sample_rate == 16000);
  CHECK(a.source_sample_rate == 44100);
  CHECK(a.source_channels == 2);
  CHECK(a.codec == "pcm_s16le");
  CHECK(std::abs(static_cast<int64_t>(a.samples.size()) - 32000) <= 16);
  CHECK(frequency(a.samples, 16000) == Approx(440.0).margin(0.5));
  // Stereo → mono must not attenuate a tone that is the same in both channels by more than 3 dB.
  CHECK(rms(a.samples, 4000, 28000) == Approx(0.125 / std::sqrt(2.0)).epsilon(0.3));
}

TEST_CASE("audio: the audio stream of a video file, and bytes in memory", "[audio]") {
  TempDir dir;
  const auto mp4 = dir.path() / "av.mp4";
  longnet::test::run_command("ffmpeg -nostdin -v error -y -f lavfi -i testsrc2=size=64x48:rate=10:duration=1 "
                             "-f lavfi -i sine=frequency=1000:sample_rate=48000:duration=1 "
                             "-c:v libx264 -c:a aac -shortest \"" + mp4.string() + "\"");
  AudioOptions opt;
  const AudioF32 a = decode_audio_file(mp4, opt);
  CHECK(a.codec == "aac");
  CHECK(a.source_sample_rate == 48000);
  CHECK(a.samples.size() >= 15000);
  CHECK(a.samples.size() <= 17500);  // AAC priming and padding add up to a few frames
  CHECK(frequency(a.samples, 16000) == Approx(1000.0).margin(1.0));

  const auto bytes = longnet::test::read_bytes(mp4);
  const AudioF32 b = decode_audio_bytes(bytes, "memory.mp4", opt);
  CHECK(a.samples == b.samples);

  opt.sample_rate = 8000;
  const AudioF32 c = decode_audio_file(mp4, opt);
  CHECK(c.sample_rate == 8000);
  CHECK(std::abs(static_cast<double>(c.samples.size()) - a.samples.size() / 2.0) <= 4.0);
}

TEST_CASE("audio: max_duration_s bounds the output", "[audio]") {
  TempDir dir;
  const auto wav = lavfi(dir.path() / "s.wav", "sine=frequency=300:sample_rate=16000:duration=3", "-c:a pcm_s16le");
  AudioOptions opt;
  opt.max_duration_s = 1.0;
  REQUIRE_THROWS_AS(decode_audio_file(wav, opt), longnet::DataError);
  CHECK_THROWS_WITH(decode_audio_file(wav, opt), Catch::Contains("s.wav") && Catch::Contains("max_duration_s"));
  opt.max_duration_s = 3.5;
  CHECK(decode_audio_file(wav, opt).samples.size() == 48000);
  opt.sample_rate = 10;
  CHECK_THROWS_AS(decode_audio_file(wav, opt), longnet::ConfigError);
}
