// Patches from images, video frames and log-mel frames, as plain arrays that the encoders turn into tensors:
// values (count, dim) float32 and positions (count, 3) int64 holding (t, y, x) on the patch grid.
//
//   image  H×W×C, patch P        → count = (H/P)·(W/P), dim = P·P·C, positions (0, y, x), grid (1, H/P, W/P)
//   video  T×H×W×C, tubelet t    → count = ⌈T/t⌉·(H/P)·(W/P), dim = t·P·P·C, positions (ti, y, x)
//   mel    frames×mels, k frames → count = ⌈frames/k⌉, dim = k·mels, positions (i, 0, 0), grid (count, 1, 1)
//
// Within a patch the values are ordered (dt, dy, dx, c) for pixels and (frame, mel) for audio. A video whose frame
// count is not a multiple of t repeats its last frame; a mel whose frame count is not a multiple of k is padded with
// `pad_value` (pass the log floor, i.e. silence). H and W must be multiples of P (ConfigError otherwise).
//
// Usage:
//   Patches p = patchify_image(load_image("a.png", opt), 16);   // p.values.size() == p.count * p.dim
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "modalities/image.h"

namespace longnet::modalities {

struct Patches {
  int64_t count = 0, dim = 0;
  std::vector<float> values;       // count × dim
  std::vector<int64_t> positions;  // count × 3: (t, y, x)
  std::array<int64_t, 3> grid{0, 0, 0};  // (T, Gh, Gw)
};

// Frames stored as frames × height × width × channels floats, contiguous.
Patches patchify_frames(const float* data, int frames, int height, int width, int channels, int patch, int tubelet);

Patches patchify_image(const ImageF32& image, int patch);

// `values` is frames × mels (row-major).
Patches patchify_mel(const float* values, int frames, int mels, int frames_per_patch, float pad_value);

}  // namespace longnet::modalities
