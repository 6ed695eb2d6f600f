#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "core/error.h"
#include "modalities/image.h"
#include "modalities/patchify.h"
#include "tests/modalities/media_fixtures.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

using namespace longnet::modalities;
using longnet::test::TempDir;

namespace {

// 48 × 64 BGR: left half pure red, right half pure blue (in RGB terms), top-left 8×8 green marker.
cv::Mat test_image() {
  cv::Mat img(48, 64, CV_8UC3, cv::Scalar(0, 0, 255));
  img(cv::Rect(32, 0, 32, 48)).setTo(cv::Scalar(255, 0, 0));
  img(cv::Rect(0, 0, 8, 8)).setTo(cv::Scalar(0, 255, 0));
  return img;
}

std::array<int, 3> rgb_at(const ImageU8& img, int y, int x) {
  const size_t i = (static_cast<size_t>(y) * img.width + x) * img.channels;
  return {img.pixels[i], img.pixels[i + 1], img.pixels[i + 2]};
}

void check_colours(const ImageU8& img, int tol) {
  REQUIRE(img.height == 48);
  REQUIRE(img.width == 64);
  REQUIRE(img.channels == 3);
  REQUIRE(img.pixels.size() == 48u * 64u * 3u);
  const auto red = rgb_at(img, 30, 10), blue = rgb_at(img, 30, 50), green = rgb_at(img, 3, 3);
  CHECK(std::abs(red[0] - 255) <= tol);
  CHECK(red[1] <= tol);
  CHECK(red[2] <= tol);
  CHECK(std::abs(blue[2] - 255) <= tol);
  CHECK(blue[0] <= tol);
  CHECK(std::abs(green[1] - 255) <= tol);
}

}  // namespace

TEST_CASE("image: png, jpeg, webp and bmp decode to RGB with the stored size", "[image]") {
  TempDir dir;
  const cv::Mat img = test_image();
  struct Case {
    std::string file;
    std::vector<int> params;
    int tol;
    std::string format;
  };
  const std::vector<Case> cases = {{"a.png", {}, 0, "png"},
                                   {"a.bmp", {}, 0, "bmp"},
                                   {"a.jpg", {cv::IMWRITE_JPEG_QUALITY, 95}, 40, "jpeg"},
                                   {"a.webp", {cv::IMWRITE_WEBP_QUALITY, 101}, 0, "webp"},  // >100: lossless
                                   {"b.webp", {cv::IMWRITE_WEBP_QUALITY, 90}, 40, "webp"}};
  for (const auto& c : cases) {
    INFO(c.file);
    const auto path = dir.path() / c.file;
    REQUIRE(cv::imwrite(path.string(), img, c.params));
    check_colours(decode_image_file(path), c.tol);
    const auto bytes = longnet::test::read_bytes(path);
    const ImageHeader h = read_image_header(bytes, c.file);
    CHECK(h.format == c.format);
    CHECK(h.width == 64);
    CHECK(h.height == 48);
    // Bytes in memory decode exactly like the file.
    CHECK(decode_image_bytes(bytes, c.file).pixels == decode_image_file(path).pixels);
  }
}

TEST_CASE("image: grayscale becomes three equal channels, alpha is dropped", "[image]") {
  TempDir dir;
  cv::Mat gray(20, 30, CV_8UC1);
  for (int y = 0; y < 20; ++y)
    for (int x = 0; x < 30; ++x) gray.at<uint8_t>(y, x) = static_cast<uint8_t>(x * 8);
  REQUIRE(cv::imwrite((dir.path() / "g.png").string(), gray));
  const ImageU8 g = decode_image_file(dir.path() / "g.png");
  REQUIRE(g.channels == 3);
  CHECK(rgb_at(g, 5, 7) == std::array<int, 3>{56, 56, 56});
  CHECK(rgb_at(g, 19, 29) == std::array<int, 3>{232, 232, 232});

  cv::Mat bgra(20, 30, CV_8UC4, cv::Scalar(10, 20, 200, 0));  // fully transparent red-ish
  bgra(cv::Rect(0, 0, 15, 20)).setTo(cv::Scalar(200, 20, 10, 128));
  REQUIRE(cv::imwrite((dir.path() / "a.png").string(), bgra));
  const ImageU8 a = decode_image_file(dir.path() / "a.png");
  REQUIRE(a.channels == 3);
  CHECK(rgb_at(a, 10, 20) == std::array<int, 3>{200, 20, 10});
  CHECK(rgb_at(a, 10, 5) == std::array<int, 3>{10, 20, 200});
}

TEST_CASE("image: the format comes from the bytes, not the extension", "[image]") {
  TempDir dir;
  REQUIRE(cv::imwrite((dir.path() / "x.jpg").string(), test_image()));
  std::filesystem::rename(dir.path() / "x.jpg", dir.path() / "x.png");
  check_colours(decode_image_file(dir.path() / "x.png"), 40);
}

TEST_CASE("image: resize policies", "[image]") {
  ImageU8 src{};
  {
    TempDir dir;
    REQUIRE(cv::imwrite((dir.path() / "a.png").string(), test_image()));
    src = decode_image_file(dir.path() / "a.png");
  }
  SECTION("exact stretches to the target") {
    const ImageU8 out = resize_image(src, {.resize = ResizePolicy::exact, .height = 24, .width = 16});
    CHECK(out.height == 24);
    CHECK(out.width == 16);
    CHECK(rgb_at(out, 20, 2)[0] == 255);   // left: red
    CHECK(rgb_at(out, 20, 13)[2] == 255);  // right: blue
  }
  SECTION("shorter_center_crop keeps the aspect ratio and the centre") {
    // 48×64 → shorter side 24 → 24×32 → centre 24×24 crop: columns 4..27 of the 24×32 image.
    const ImageU8 out = resize_image(src, {.resize = ResizePolicy::shorter_center_crop, .height = 24, .width = 24});
    CHECK(out.height == 24);
    CHECK(out.width == 24);
    CHECK(rgb_at(out, 12, 1)[0] == 255);    // still red left of the centre
    CHECK(rgb_at(out, 12, 22)[2] == 255);   // blue right of it
    CHECK(rgb_at(out, 0, 0)[1] == 0);       // the green marker (columns 0..3 at this scale) was cropped away
  }
  SECTION("enlarging works too") {
    const ImageU8 out = resize_image(src, {.resize = ResizePolicy::shorter_center_crop, .height = 96, .width = 96});
    CHECK(out.height == 96);
    CHECK(out.width == 96);
  }
  SECTION("none keeps the size") {
    CHECK(resize_image(src, {.resize = ResizePolicy::none}).pixels == src.pixels);
  }
  CHECK(parse_resize_policy("exact") == ResizePolicy::exact);
  CHECK_THROWS_AS(parse_resize_policy("stretch"), longnet::ConfigError);
  CHECK_THROWS_AS(resize_image(src, {.resize = ResizePolicy::exact, .height = 0, .width = 4}), longnet::ConfigError);
}

TEST_CASE("image: normalisation per channel", "[image]") {
  const ImageU8 img{1, 2, 3, {255, 0, 128, 0, 255, 51}};
  const ImageF32 out = normalize_image(img, {0.5F, 0.25F, 0.0F}, {0.5F, 0.25F, 2.0F});
  REQUIRE(out.pixels.size() == 6);
  CHECK(out.pixels[0] == Approx(1.0));                   // (1 - 0.5) / 0.5
  CHECK(out.pixels[1] == Approx(-1.0));                  // (0 - 0.25) / 0.25
  CHECK(out.pixels[2] == Approx(128.0 / 255.0 / 2.0));   // (0.502 - 0) / 2
  CHECK(out.pixels[4] == Approx(3.0));                   // (1 - 0.25) / 0.25
  CHECK(out.pixels[5] == Approx(0.1));                   // 0.2 / 2
}

TEST_CASE("image: patchify into P×P×C rows with (0, y, x) positions", "[image][patchify]") {
  // 4×6 image, 2 channels where channel 0 = y·10 + x and channel 1 = -(y·10 + x).
  ImageF32 img{4, 6, 2, {}};
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 6; ++x) {
      img.pixels.push_back(static_cast<float>(y * 10 + x));
      img.pixels.push_back(static_cast<float>(-(y * 10 + x)));
    }
  const Patches p = patchify_image(img, 2);
  CHECK(p.count == 6);
  CHECK(p.dim == 8);
  CHECK(p.grid == std::array<int64_t, 3>{1, 2, 3});
  REQUIRE(p.values.size() == 48);
  REQUIRE(p.positions.size() == 18);
  // Patch 4 is (y = 1, x = 1): rows 2..3, columns 2..3.
  CHECK(std::vector<int64_t>(p.positions.begin() + 12, p.positions.begin() + 15) == std::vector<int64_t>{0, 1, 1});
  const std::vector<float> expect{22, -22, 23, -23, 32, -32, 33, -33};
  CHECK(std::vector<float>(p.values.begin() + 32, p.values.begin() + 40) == expect);
  CHECK_THROWS_AS(patchify_image(img, 4), longnet::ConfigError);  // 6 is not a multiple of 4
}

TEST_CASE("image: load_image runs decode, resize and normalise", "[image]") {
  TempDir dir;
  REQUIRE(cv::imwrite((dir.path() / "a.png").string(), test_image()));
  ImageOptions opt{.resize = ResizePolicy::exact, .height = 32, .width = 32};
  const ImageF32 img = load_image(dir.path() / "a.png", opt);
  REQUIRE(img.pixels.size() == 32u * 32u * 3u);
  // A red pixel on the left: R = (1 - 0.485) / 0.229.
  CHECK(img.pixels[(20 * 32 + 2) * 3] == Approx((1.0 - 0.485) / 0.229).epsilon(1e-5));
  const Patches p = patchify_image(img, 16);
  CHECK(p.count == 4);
  CHECK(p.dim == 16 * 16 * 3);
}
