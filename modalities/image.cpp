#include "modalities/image.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "core/error.h"

namespace longnet::modalities {
namespace {

[[noreturn]] void fail(const std::string& name, const std::string& reason) {
  throw DataError(name + ": " + reason);
}

uint32_t be16(const uint8_t* p) { return (uint32_t{p[0]} << 8) | p[1]; }
uint32_t be32(const uint8_t* p) { return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3]; }
uint32_t le16(const uint8_t* p) { return uint32_t{p[0]} | (uint32_t{p[1]} << 8); }
uint32_t le24(const uint8_t* p) { return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16); }
uint32_t le32(const uint8_t* p) { return le24(p) | (uint32_t{p[3]} << 24); }

bool starts_with(std::span<const uint8_t> b, size_t at, std::string_view s) {
  return b.size() >= at + s.size() && std::memcmp(b.data() + at, s.data(), s.size()) == 0;
}

ImageHeader png_header(std::span<const uint8_t> b, const std::string& name) {
  if (b.size() < 24 || !starts_with(b, 12, "IHDR")) fail(name, "png header is truncated or has no IHDR chunk");
  return {"png", static_cast<int>(std::min<uint32_t>(be32(&b[16]), INT32_MAX)),
          static_cast<int>(std::min<uint32_t>(be32(&b[20]), INT32_MAX))};
}

// Walks the marker segments up to the frame header (SOFn). Also requires an end-of-image marker after it: libjpeg
// "decodes" a truncated file by filling the missing rows with grey and only warns.
ImageHeader jpeg_header(std::span<const uint8_t> b, const std::string& name) {
  size_t i = 2;
  while (true) {
    while (i < b.size() && b[i] != 0xFF) ++i;  // tolerate junk between segments like libjpeg does
    while (i < b.size() && b[i] == 0xFF) ++i;  // fill bytes
    if (i >= b.size()) fail(name, "jpeg data ends before the frame header (truncated)");
    const uint8_t marker = b[i];
    const size_t seg = i + 1;  // first byte after the marker
    if (marker == 0xD8 || marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) {
      i = seg;
      continue;
    }
    if (marker == 0xDA || marker == 0xD9) fail(name, "jpeg has no frame header before the scan data");
    if (seg + 2 > b.size()) fail(name, "jpeg segment header is truncated");
    const uint32_t len = be16(&b[seg]);
    if (len < 2) fail(name, "jpeg segment has an invalid length");
    const bool sof = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
    if (sof) {
      if (seg + 7 > b.size()) fail(name, "jpeg frame header is truncated");
      ImageHeader h{"jpeg", static_cast<int>(be16(&b[seg + 5])), static_cast<int>(be16(&b[seg + 3]))};
      bool has_eoi = false;
      for (size_t k = b.size() - 1; k > seg + 7; --k) {
        if (b[k] == 0xD9 && b[k - 1] == 0xFF) {
          has_eoi = true;
          break;
        }
      }
      if (!has_eoi) fail(name, "jpeg data has no end-of-image marker (truncated)");
      return h;
    }
    i = seg + len;
  }
}

ImageHeader webp_header(std::span<const uint8_t> b, const std::string& name) {
  if (b.size() < 30) fail(name, "webp header is truncated");
  if (starts_with(b, 12, "VP8 ")) {
    if (b[23] != 0x9D || b[24] != 0x01 || b[25] != 0x2A) fail(name, "webp VP8 frame has a bad start code");
    return {"webp", static_cast<int>(le16(&b[26]) & 0x3FFF), static_cast<int>(le16(&b[28]) & 0x3FFF)};
  }
  if (starts_with(b, 12, "VP8L")) {
    if (b[20] != 0x2F) fail(name, "webp lossless frame has a bad signature");
    const uint32_t bits = le32(&b[21]);
    return {"webp", static_cast<int>((bits & 0x3FFF) + 1), static_cast<int>(((bits >> 14) & 0x3FFF) + 1)};
  }
  if (starts_with(b, 12, "VP8X")) {
    return {"webp", static_cast<int>(le24(&b[24]) + 1), static_cast<int>(le24(&b[27]) + 1)};
  }
  fail(name, "webp has an unknown first chunk");
}

ImageHeader bmp_header(std::span<const uint8_t> b, const std::string& name) {
  if (b.size() < 26) fail(name, "bmp header is truncated");
  const uint32_t dib = le32(&b[14]);
  int64_t w = 0, h = 0;
  if (dib == 12) {
    w = le16(&b[18]);
    h = le16(&b[20]);
  } else {
    w = static_cast<int32_t>(le32(&b[18]));
    h = static_cast<int32_t>(le32(&b[22]));  // negative: rows stored top-down
  }
  w = std::min<int64_t>(std::llabs(w), INT32_MAX);
  h = std::min<int64_t>(std::llabs(h), INT32_MAX);
  ImageHeader out{"bmp", static_cast<int>(w), static_cast<int>(h)};
  // Uncompressed bitmaps: decode_image_bytes requires the whole pixel array (OpenCV reads short files silently).
  if (dib >= 40 && b.size() >= 34 && le32(&b[30]) == 0 && le16(&b[28]) > 0) {
    const uint64_t stride = ((static_cast<uint64_t>(w) * le16(&b[28]) + 31) / 32) * 4;  // < 2^48, no overflow
    const bool huge = h > 0 && stride > (uint64_t{INT64_MAX} - le32(&b[10])) / static_cast<uint64_t>(h);
    out.min_bytes = huge ? INT64_MAX : static_cast<int64_t>(le32(&b[10]) + stride * static_cast<uint64_t>(h));
  }
  return out;
}

}  // namespace

ResizePolicy parse_resize_policy(std::string_view name) {
  if (name == "none") return ResizePolicy::none;
  if (name == "exact") return ResizePolicy::exact;
  if (name == "shorter_center_crop") return ResizePolicy::shorter_center_crop;
  throw ConfigError("resize policy '" + std::string(name) + "': expected none | exact | shorter_center_crop");
}

void ImageOptions::validate() const {
  if (resize != ResizePolicy::none && (height <= 0 || width <= 0)) {
    throw ConfigError("image options: height and width must be positive (got " + std::to_string(height) + "x" +
                      std::to_string(width) + ")");
  }
  for (float s : std) {
    if (!(s > 0.0F)) throw ConfigError("image options: std must be positive in every channel");
  }
  if (limits.max_side <= 0 || limits.max_pixels <= 0 || limits.max_file_bytes <= 0) {
    throw ConfigError("image options: limits must be positive");
  }
}

ImageHeader read_image_header(std::span<const uint8_t> b, const std::string& name) {
  if (b.empty()) fail(name, "empty file");
  if (starts_with(b, 0, "\x89PNG\r\n\x1a\n")) return png_header(b, name);
  if (b.size() >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF) return jpeg_header(b, name);
  if (starts_with(b, 0, "RIFF") && starts_with(b, 8, "WEBP")) return webp_header(b, name);
  if (starts_with(b, 0, "BM")) return bmp_header(b, name);
  fail(name, "not a supported image format (expected png, jpeg, webp or bmp data)");
}

std::vector<uint8_t> read_file_bytes(const std::filesystem::path& path, int64_t max_bytes) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) throw IoError(path.string() + ": no such file");
  if (std::filesystem::is_directory(status)) throw IoError(path.string() + ": is a directory, not a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(path.string() + ": cannot open for reading: " + std::strerror(errno));
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) throw IoError(path.string() + ": cannot determine the file size");
  if (size > max_bytes) {
    fail(path.string(), "file is " + std::to_string(size) + " bytes, more than the limit of " +
                            std::to_string(max_bytes));
  }
  in.seekg(0);
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size)) {
    throw IoError(path.string() + ": read failed: " + std::strerror(errno));
  }
  return bytes;
}

ImageU8 decode_image_bytes(std::span<const uint8_t> bytes, const std::string& name, const ImageLimits& limits) {
  // cv::Mat sizes are int.
  if (static_cast<int64_t>(bytes.size()) > std::min<int64_t>(limits.max_file_bytes, INT32_MAX)) {
    fail(name, std::to_string(bytes.size()) + " bytes, more than the limit of " +
                   std::to_string(limits.max_file_bytes));
  }
  const ImageHeader h = read_image_header(bytes, name);
  const std::string dims = std::to_string(h.width) + "x" + std::to_string(h.height);
  if (h.width <= 0 || h.height <= 0) fail(name, h.format + " header has empty dimensions " + dims);
  if (h.width > limits.max_side || h.height > limits.max_side ||
      int64_t{h.width} * h.height > limits.max_pixels) {
    fail(name, h.format + " header claims " + dims + " pixels, beyond the limits (side " +
                   std::to_string(limits.max_side) + ", pixels " + std::to_string(limits.max_pixels) + ")");
  }
  if (h.min_bytes > static_cast<int64_t>(bytes.size())) {
    fail(name, h.format + " pixel data is truncated (" + std::to_string(bytes.size()) + " of " +
                   std::to_string(h.min_bytes) + " bytes)");
  }
  cv::Mat bgr;
  try {
    // cv::Mat over the caller's bytes without copying; imdecode does not write to it.
    const cv::Mat raw(1, static_cast<int>(bytes.size()), CV_8UC1, const_cast<uint8_t*>(bytes.data()));
    bgr = cv::imdecode(raw, cv::IMREAD_COLOR);
  } catch (const cv::Exception& e) {
    fail(name, h.format + " could not be decoded: " + e.what());
  }
  if (bgr.empty()) fail(name, h.format + " data could not be decoded (damaged or truncated)");
  if (bgr.depth() != CV_8U || bgr.channels() != 3) fail(name, "decoder returned an unexpected pixel type");

  ImageU8 out{bgr.rows, bgr.cols, 3, {}};
  out.pixels.resize(static_cast<size_t>(out.height) * out.width * 3);
  cv::Mat rgb(out.height, out.width, CV_8UC3, out.pixels.data());
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return out;
}

ImageU8 decode_image_file(const std::filesystem::path& path, const ImageLimits& limits) {
  const std::vector<uint8_t> bytes = read_file_bytes(path, limits.max_file_bytes);
  return decode_image_bytes(bytes, path.string(), limits);
}

ImageU8 resize_image(const ImageU8& image, const ImageOptions& options) {
  options.validate();
  if (options.resize == ResizePolicy::none) return image;
  if (image.height <= 0 || image.width <= 0 || image.channels <= 0 ||
      image.pixels.size() != static_cast<size_t>(image.height) * image.width * image.channels) {
    throw DataError("resize_image: image buffer does not match its dimensions");
  }
  const cv::Mat src(image.height, image.width, CV_8UC(image.channels), const_cast<uint8_t*>(image.pixels.data()));
  int rh = options.height, rw = options.width;
  if (options.resize == ResizePolicy::shorter_center_crop) {
    const double scale = std::max(static_cast<double>(options.height) / image.height,
                                  static_cast<double>(options.width) / image.width);
    rh = std::max(options.height, static_cast<int>(std::lround(image.height * scale)));
    rw = std::max(options.width, static_cast<int>(std::lround(image.width * scale)));
  }
  cv::Mat resized;
  if (rh == image.height && rw == image.width) {
    resized = src;
  } else {
    const bool shrink = rh < image.height || rw < image.width;
    cv::resize(src, resized, cv::Size(rw, rh), 0, 0, shrink ? cv::INTER_AREA : cv::INTER_LINEAR);
  }
  const int y0 = (rh - options.height) / 2, x0 = (rw - options.width) / 2;
  const cv::Mat crop = resized(cv::Rect(x0, y0, options.width, options.height));
  ImageU8 out{options.height, options.width, image.channels, {}};
  out.pixels.resize(static_cast<size_t>(out.height) * out.width * out.channels);
  crop.copyTo(cv::Mat(out.height, out.width, CV_8UC(out.channels), out.pixels.data()));
  return out;
}

ImageF32 normalize_image(const ImageU8& image, const std::array<float, 3>& mean, const std::array<float, 3>& std) {
  if (image.channels != 3) throw DataError("normalize_image: expected 3 channels, got " + std::to_string(image.channels));
  ImageF32 out{image.height, image.width, 3, std::vector<float>(image.pixels.size())};
  std::array<float, 3> scale{}, shift{};
  for (int c = 0; c < 3; ++c) {
    scale[c] = 1.0F / (255.0F * std[c]);
    shift[c] = -mean[c] / std[c];
  }
  for (size_t i = 0; i < image.pixels.size(); ++i) {
    const size_t c = i % 3;
    out.pixels[i] = static_cast<float>(image.pixels[i]) * scale[c] + shift[c];
  }
  return out;
}

ImageF32 load_image(const std::filesystem::path& path, const ImageOptions& options) {
  options.validate();
  return normalize_image(resize_image(decode_image_file(path, options.limits), options), options.mean, options.std);
}

}  // namespace longnet::modalities
