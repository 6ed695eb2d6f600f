// Image decoding (OpenCV) into plain RGB buffers: jpeg, png, webp and bmp, grayscale and alpha inputs included, from
// a file or from bytes in memory; resize/crop policies; per-channel normalisation. No torch here.
//
// The format is read from the bytes (never from the file name). The header is parsed before OpenCV decodes, so a
// file claiming absurd dimensions is refused without allocating. Grayscale is replicated to RGB; alpha is dropped
// (the colour channels are kept as stored, not composited). Failures throw DataError (IoError for a missing or
// unreadable file) naming the file and the reason.
//
// Usage:
//   ImageOptions opt{.resize = ResizePolicy::shorter_center_crop, .height = 224, .width = 224};
//   ImageF32 img = load_image("cat.jpg", opt);          // decode + resize/crop + normalise
//   Patches p = patchify_image(img, 16);                  // modalities/patchify.h
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace longnet::modalities {

// Interleaved RGB (channels = 3) unless stated otherwise, row-major: pixels[(y * width + x) * channels + c].
struct ImageU8 {
  int height = 0, width = 0, channels = 0;
  std::vector<uint8_t> pixels;
};

// Same layout as ImageU8, normalised floats.
struct ImageF32 {
  int height = 0, width = 0, channels = 0;
  std::vector<float> pixels;
};

enum class ResizePolicy {
  none,                 // keep the decoded size
  exact,                // stretch to height × width (aspect ratio not kept)
  shorter_center_crop,  // scale so that the shorter side fits, then crop the centre height × width
};

// "none" | "exact" | "shorter_center_crop"; throws ConfigError otherwise.
ResizePolicy parse_resize_policy(std::string_view name);

// Bounds that hold before any pixel is decoded, so hostile headers cannot allocate gigabytes.
struct ImageLimits {
  int max_side = 16384;
  int64_t max_pixels = int64_t{1} << 27;   // 134 M pixels, ~400 MB as RGB
  int64_t max_file_bytes = int64_t{1} << 28;
};

struct ImageOptions {
  ResizePolicy resize = ResizePolicy::shorter_center_crop;
  int height = 224, width = 224;                       // target size (unused with ResizePolicy::none)
  std::array<float, 3> mean{0.485F, 0.456F, 0.406F};   // per RGB channel, on values scaled to [0, 1]
  std::array<float, 3> std{0.229F, 0.224F, 0.225F};
  ImageLimits limits{};

  // Throws ConfigError naming the bad field.
  void validate() const;
};

// Width and height from the header alone (png, jpeg, webp, bmp); throws DataError for other or damaged headers.
struct ImageHeader {
  std::string format;  // "png" | "jpeg" | "webp" | "bmp"
  int width = 0, height = 0;
  int64_t min_bytes = 0;  // uncompressed bmp: the size the pixel array needs (0 when unknown)
};
ImageHeader read_image_header(std::span<const uint8_t> bytes, const std::string& name);

// Decoded RGB at the stored size. `name` is used in error messages only.
ImageU8 decode_image_bytes(std::span<const uint8_t> bytes, const std::string& name, const ImageLimits& limits = {});
ImageU8 decode_image_file(const std::filesystem::path& path, const ImageLimits& limits = {});

// Resize/crop according to the policy (area interpolation when shrinking, bilinear when enlarging).
ImageU8 resize_image(const ImageU8& image, const ImageOptions& options);

// (value / 255 - mean[c]) / std[c] for every pixel of an RGB image.
ImageF32 normalize_image(const ImageU8& image, const std::array<float, 3>& mean, const std::array<float, 3>& std);

// decode_image_file + resize_image + normalize_image.
ImageF32 load_image(const std::filesystem::path& path, const ImageOptions& options);

// The whole file as bytes; IoError naming the path when it is missing or unreadable, DataError when it is larger
// than `max_bytes`.
std::vector<uint8_t> read_file_bytes(const std::filesystem::path& path, int64_t max_bytes);

}  // namespace longnet::modalities
