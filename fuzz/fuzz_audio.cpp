// libFuzzer target: audio (or any container) bytes through decode, resampling to 16 kHz mono, log-mel and patches
// (modalities/audio.h, modalities/mel.h). Built and run by tools/fuzz.sh. Typed errors (longnet::Error) are the
// expected outcome for bad input; anything else is a finding.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include "core/error.h"
#include "modalities/audio.h"
#include "modalities/mel.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace longnet::modalities;
  AudioOptions opt;
  opt.max_duration_s = 4.0;  // long enough for every seed; keeps garbage that decodes as hours of noise fast
  opt.timeout_s = 5.0;
  try {
    const AudioF32 a = decode_audio_bytes(std::span<const uint8_t>(data, size), "fuzz input", opt);
    if (a.samples.empty()) return 0;
    const LogMel m = log_mel(std::span<const float>(a.samples).first(std::min<size_t>(a.samples.size(), 16000)),
                             MelOptions{});
    const Patches p = patchify_log_mel(m, 4);
    if (p.count != (m.frames + 3) / 4) __builtin_trap();
  } catch (const longnet::Error&) {
  }
  return 0;
}
