// libFuzzer target: container bytes through demux (a custom AVIOContext over memory), threaded decode, sampling,
// seeking, clip windows, conversion (including 4:2:0 frames averaged 2×2 before scaling) and tubelet patches
// (modalities/video.h). Built and run by tools/fuzz.sh. Typed errors
// (longnet::Error) are the expected outcome for bad input; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <span>

#include "core/error.h"
#include "modalities/video.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace longnet::modalities;
  VideoOptions opt;
  // The input's size picks the sampling mode, so that the corpus covers every path deterministically.
  const FrameSampling modes[] = {FrameSampling::uniform, FrameSampling::fps, FrameSampling::all};
  opt.sampling = modes[size % 3];
  opt.num_frames = 3;
  opt.fps = 5.0;
  opt.height = 16;
  opt.width = size % 7 == 0 ? 13 : 16;  // also a width that is no multiple of the SIMD block
  opt.clips = 1 + static_cast<int>(size % 3);  // windows of the stream (VideoOptions: clips)
  opt.clip = static_cast<int>(size / 3 % static_cast<size_t>(opt.clips));
  opt.clip_seconds = static_cast<double>(size % 5) * 0.3;
  opt.resize = size % 2 ? ResizePolicy::shorter_center_crop : ResizePolicy::exact;
  opt.threads = 1;
  opt.seek_gap_s = 0.1;
  opt.max_side = 1024;
  opt.max_output_bytes = int64_t{1} << 22;
  opt.max_decoded_bytes = int64_t{1} << 26;
  opt.timeout_s = 5.0;
  try {
    const VideoFrames v = decode_video_bytes(std::span<const uint8_t>(data, size), "fuzz input", opt);
    const Patches p = patchify_video(v, {0.5F, 0.5F, 0.5F}, {0.25F, 0.25F, 0.25F}, 8, 2);
    if (p.count != ((v.frames + 1) / 2) * (v.height / 8) * (v.width / 8)) __builtin_trap();
  } catch (const longnet::Error&) {
  }
  return 0;
}
