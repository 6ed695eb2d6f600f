#include "modalities/patchify.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/error.h"

namespace longnet::modalities {

Patches patchify_frames(const float* data, int frames, int height, int width, int channels, int patch, int tubelet) {
  if (patch <= 0 || tubelet <= 0) throw ConfigError("patchify: patch size and tubelet must be positive");
  if (frames <= 0 || height <= 0 || width <= 0 || channels <= 0) {
    throw DataError("patchify: empty input (" + std::to_string(frames) + " frames of " + std::to_string(height) +
                    "x" + std::to_string(width) + "x" + std::to_string(channels) + ")");
  }
  if (height % patch != 0 || width % patch != 0) {
    throw ConfigError("patchify: image size " + std::to_string(height) + "x" + std::to_string(width) +
                      " is not a multiple of the patch size " + std::to_string(patch));
  }
  const int64_t gt = (frames + tubelet - 1) / tubelet, gh = height / patch, gw = width / patch;
  const int64_t row = int64_t{patch} * channels;  // floats of one patch row within a frame
  Patches out;
  out.grid = {gt, gh, gw};
  out.count = gt * gh * gw;
  out.dim = int64_t{tubelet} * patch * row;
  out.values.resize(static_cast<size_t>(out.count * out.dim));
  out.positions.resize(static_cast<size_t>(out.count * 3));
  const int64_t frame_size = int64_t{height} * width * channels;
  float* dst = out.values.data();
  int64_t n = 0;
  for (int64_t t = 0; t < gt; ++t) {
    for (int64_t y = 0; y < gh; ++y) {
      for (int64_t x = 0; x < gw; ++x, ++n) {
        for (int64_t dt = 0; dt < tubelet; ++dt) {
          const int64_t f = std::min<int64_t>(t * tubelet + dt, frames - 1);  // repeat the last frame
          for (int64_t dy = 0; dy < patch; ++dy) {
            const float* src = data + f * frame_size + ((y * patch + dy) * width + x * patch) * channels;
            std::memcpy(dst, src, static_cast<size_t>(row) * sizeof(float));
            dst += row;
          }
        }
        out.positions[n * 3 + 0] = t;
        out.positions[n * 3 + 1] = y;
        out.positions[n * 3 + 2] = x;
      }
    }
  }
  return out;
}

Patches patchify_image(const ImageF32& image, int patch) {
  if (image.pixels.size() != static_cast<size_t>(image.height) * image.width * image.channels) {
    throw DataError("patchify_image: pixel buffer does not match the image dimensions");
  }
  return patchify_frames(image.pixels.data(), 1, image.height, image.width, image.channels, patch, 1);
}

Patches patchify_mel(const float* values, int frames, int mels, int frames_per_patch, float pad_value) {
  if (frames_per_patch <= 0) throw ConfigError("patchify_mel: frames_per_patch must be positive");
  if (frames <= 0 || mels <= 0) throw DataError("patchify_mel: empty spectrogram");
  Patches out;
  out.count = (frames + frames_per_patch - 1) / frames_per_patch;
  out.dim = int64_t{frames_per_patch} * mels;
  out.grid = {out.count, 1, 1};
  out.values.assign(static_cast<size_t>(out.count * out.dim), pad_value);
  std::memcpy(out.values.data(), values, static_cast<size_t>(frames) * mels * sizeof(float));
  out.positions.assign(static_cast<size_t>(out.count * 3), 0);
  for (int64_t i = 0; i < out.count; ++i) out.positions[i * 3] = i;
  return out;
}

}  // namespace longnet::modalities
