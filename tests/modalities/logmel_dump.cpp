// logmel_dump AUDIO OUT_PREFIX [N_FFT]: decodes AUDIO to 16 kHz mono and writes OUT_PREFIX.samples.f32 (the samples)
// and OUT_PREFIX.logmel.f32 (frames × 80 log-mel values, row-major), raw little-endian float32, for
// tools/check_logmel.py. Prints "frames mels" on success.
#include <cstdio>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "modalities/audio.h"
#include "modalities/mel.h"

namespace {

std::string_view as_bytes(const std::vector<float>& v) {
  return {reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::fprintf(stderr, "usage: logmel_dump AUDIO OUT_PREFIX [N_FFT]\n");
    return 2;
  }
  try {
    using namespace longnet::modalities;
    const AudioF32 audio = decode_audio_file(argv[1], {});
    MelOptions opt;
    if (argc == 4) opt.n_fft = std::stoi(argv[3]);
    const LogMel mel = log_mel(audio.samples, opt);
    const std::string prefix = argv[2];
    longnet::write_file_atomic(prefix + ".samples.f32", as_bytes(audio.samples));
    longnet::write_file_atomic(prefix + ".logmel.f32", as_bytes(mel.values));
    std::printf("%d %d\n", mel.frames, mel.mels);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "logmel_dump: %s\n", longnet::format_error_chain(e).c_str());
    return 1;
  }
}
