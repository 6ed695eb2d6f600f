// Damaged, hostile and unreadable media: every case is a typed error naming the file and the reason.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>

#include "core/error.h"
#include "modalities/audio.h"
#include "modalities/image.h"
#include "modalities/video.h"
#include "tests/modalities/media_fixtures.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

using namespace longnet::modalities;
using Catch::Contains;
using longnet::test::lavfi;
using longnet::test::read_bytes;
using longnet::test::TempDir;
using longnet::test::write_bytes;

namespace {

std::vector<uint8_t> head(const std::vector<uint8_t>& b, size_t n) { return {b.begin(), b.begin() + static_cast<std::ptrdiff_t>(n)}; }

// Runs `f`, requires an exception of type E whose message contains every fragment.
template <typename E, typename F>
void expect_error(F&& f, const std::vector<std::string>& fragments) {
  try {
    f();
  } catch (const E& e) {
    const std::string msg = e.what();
    INFO(msg);
    for (const auto& s : fragments) CHECK_THAT(msg, Contains(s));
    return;
  } catch (const std::exception& e) {
    FAIL("wrong exception type: " << e.what());
  }
  FAIL("no exception");
}

VideoOptions tiny_video() {
  VideoOptions o;
  o.sampling = FrameSampling::uniform;
  o.num_frames = 2;
  o.height = 16;
  o.width = 16;
  return o;
}

}  // namespace

TEST_CASE("bad images: empty, truncated, corrupt, wrong format, absurd dimensions", "[bad_media][image]") {
  TempDir dir;
  cv::Mat img(64, 64, CV_8UC3, cv::Scalar(10, 200, 30));
  cv::randu(img, 0, 255);  // noise: compressed data spans the whole file
  REQUIRE(cv::imwrite((dir.path() / "ok.png").string(), img));
  REQUIRE(cv::imwrite((dir.path() / "ok.jpg").string(), img));
  REQUIRE(cv::imwrite((dir.path() / "ok.bmp").string(), img));
  REQUIRE(cv::imwrite((dir.path() / "ok.webp").string(), img));
  const auto png = read_bytes(dir.path() / "ok.png"), jpg = read_bytes(dir.path() / "ok.jpg");
  const auto bmp = read_bytes(dir.path() / "ok.bmp"), webp = read_bytes(dir.path() / "ok.webp");

  write_bytes(dir.path() / "empty.png", {});
  expect_error<longnet::DataError>([&] { decode_image_file(dir.path() / "empty.png"); }, {"empty.png", "empty file"});

  for (const auto& [name, bytes] : std::vector<std::pair<std::string, std::vector<uint8_t>>>{
           {"trunc.png", head(png, png.size() / 2)},
           {"trunc.jpg", head(jpg, jpg.size() / 2)},
           {"trunc.bmp", head(bmp, bmp.size() / 2)},
           {"trunc.webp", head(webp, webp.size() / 2)},
           {"header_only.jpg", head(jpg, 20)}}) {
    write_bytes(dir.path() / name, bytes);
    expect_error<longnet::DataError>([&] { decode_image_file(dir.path() / name); }, {name});
  }
  expect_error<longnet::DataError>([&] { decode_image_file(dir.path() / "trunc.jpg"); }, {"truncated"});

  // Corrupt: the signature survives, the chunk data after it is garbage.
  std::vector<uint8_t> corrupt = png;
  for (size_t i = 40; i < corrupt.size(); ++i) corrupt[i] = static_cast<uint8_t>(i * 7919);
  write_bytes(dir.path() / "corrupt.png", corrupt);
  expect_error<longnet::DataError>([&] { decode_image_file(dir.path() / "corrupt.png"); },
                                   {"corrupt.png", "could not be decoded"});

  // Wrong extension: audio named .jpg.
  lavfi(dir.path() / "sound.wav", "sine=duration=0.1", "-c:a pcm_s16le");
  std::filesystem::rename(dir.path() / "sound.wav", dir.path() / "sound.jpg");
  expect_error<longnet::DataError>([&] { decode_image_file(dir.path() / "sound.jpg"); },
                                   {"sound.jpg", "not a supported image format"});

  // Absurd dimensions in the header: refused before decoding.
  std::vector<uint8_t> huge = png;
  for (int i : {16, 20}) {  // IHDR width, height = 100000 big-endian
    huge[i] = 0x00;
    huge[i + 1] = 0x01;
    huge[i + 2] = 0x86;
    huge[i + 3] = 0xA0;
  }
  expect_error<longnet::DataError>([&] { decode_image_bytes(huge, "huge.png"); },
                                   {"huge.png", "100000x100000", "beyond the limits"});
  std::vector<uint8_t> huge_bmp = bmp;
  for (int i : {18, 22}) {  // BITMAPINFOHEADER width, height = 100000 little-endian
    huge_bmp[i] = 0xA0;
    huge_bmp[i + 1] = 0x86;
    huge_bmp[i + 2] = 0x01;
    huge_bmp[i + 3] = 0x00;
  }
  expect_error<longnet::DataError>([&] { decode_image_bytes(huge_bmp, "huge.bmp"); }, {"huge.bmp", "100000x100000"});
  // The limits are options: a 64×64 image is too large for max_side 32.
  expect_error<longnet::DataError>([&] { decode_image_bytes(png, "ok.png", {.max_side = 32}); }, {"ok.png", "64x64"});
  expect_error<longnet::DataError>([&] { decode_image_bytes(png, "ok.png", {.max_file_bytes = 100}); },
                                   {"ok.png", "limit"});
}

TEST_CASE("bad files: missing, a folder, not a folder, no read permission", "[bad_media]") {
  TempDir dir;
  const auto missing = dir.path() / "missing.mp4";
  expect_error<longnet::IoError>([&] { decode_image_file(missing); }, {"missing.mp4", "no such file"});
  expect_error<longnet::IoError>([&] { decode_video_file(missing, tiny_video()); }, {"missing.mp4", "no such file"});
  expect_error<longnet::IoError>([&] { decode_audio_file(missing, {}); }, {"missing.mp4", "no such file"});
  expect_error<longnet::IoError>([&] { decode_video_file(dir.path(), tiny_video()); }, {"is a directory"});
  const auto file = dir.write("plain.txt", "text");
  expect_error<longnet::IoError>([&] { decode_audio_file(file / "inner.wav", {}); }, {"inner.wav"});

  const auto locked = lavfi(dir.path() / "locked.wav", "sine=duration=0.1", "-c:a pcm_s16le");
  ::chmod(locked.c_str(), 0);
  if (::geteuid() != 0) {  // root reads anything; the permission case needs an ordinary user
    expect_error<longnet::IoError>([&] { decode_audio_file(locked, {}); }, {"locked.wav", "Permission denied"});
    expect_error<longnet::IoError>([&] { decode_image_file(locked); }, {"locked.wav", "Permission denied"});
  } else {
    CHECK(decode_audio_file(locked, {}).samples.size() == 1600);
  }
}

TEST_CASE("bad video: empty, truncated, corrupt, wrong content, missing streams, unsupported codec", "[bad_media][video]") {
  TempDir dir;
  const auto mp4 = lavfi(dir.path() / "ok.mp4", "testsrc2=size=64x48:rate=10:duration=2", "-c:v libx264");
  const auto bytes = read_bytes(mp4);

  write_bytes(dir.path() / "empty.mp4", {});
  expect_error<longnet::DataError>([&] { decode_video_file(dir.path() / "empty.mp4", tiny_video()); },
                                   {"empty.mp4", "empty file"});
  expect_error<longnet::DataError>([&] { decode_video_bytes({}, "empty bytes", tiny_video()); }, {"empty bytes"});

  write_bytes(dir.path() / "trunc.mp4", head(bytes, bytes.size() / 2));  // the index (moov) is at the end
  expect_error<longnet::DataError>([&] { decode_video_file(dir.path() / "trunc.mp4", tiny_video()); },
                                   {"trunc.mp4", "not a readable media container"});

  std::vector<uint8_t> noise(4096);
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = static_cast<uint8_t>((i * 2654435761U) >> 13);
  write_bytes(dir.path() / "noise.mp4", noise);
  expect_error<longnet::DataError>([&] { decode_video_file(dir.path() / "noise.mp4", tiny_video()); }, {"noise.mp4"});

  // A keyframe-less stream: the mp4 index survives, the frame data is garbage.
  std::vector<uint8_t> scrambled = bytes;
  for (size_t i = 64; i + 2000 < scrambled.size(); ++i) scrambled[i] ^= static_cast<uint8_t>(0x5A + i);
  write_bytes(dir.path() / "scrambled.mp4", scrambled);
  expect_error<longnet::DataError>([&] { decode_video_file(dir.path() / "scrambled.mp4", tiny_video()); },
                                   {"scrambled.mp4"});

  const auto wav = lavfi(dir.path() / "a.wav", "sine=duration=0.5", "-c:a pcm_s16le");
  expect_error<longnet::DataError>([&] { decode_video_file(wav, tiny_video()); }, {"a.wav", "no video stream"});
  std::filesystem::copy_file(wav, dir.path() / "sound.mp4");  // wrong extension: still no video stream
  expect_error<longnet::DataError>([&] { decode_video_file(dir.path() / "sound.mp4", tiny_video()); },
                                   {"sound.mp4", "no video stream"});
  expect_error<longnet::DataError>([&] { decode_audio_file(mp4, {}); }, {"ok.mp4", "no audio stream"});
  dir.write("notes.mp4", "just some text, not a container\n");
  expect_error<longnet::DataError>([&] { decode_video_file(dir.path() / "notes.mp4", tiny_video()); },
                                   {"notes.mp4", "not a readable media container"});

  // Unsupported codec: an AVI whose codec tag is unknown to FFmpeg.
  const auto avi = lavfi(dir.path() / "ok.avi", "testsrc2=size=64x48:rate=10:duration=1", "-c:v mpeg4");
  std::vector<uint8_t> tagged = read_bytes(avi);
  int replaced = 0;
  for (size_t i = 0; i + 4 <= tagged.size(); ++i) {
    if (tagged[i] == 'F' && tagged[i + 1] == 'M' && tagged[i + 2] == 'P' && tagged[i + 3] == '4') {
      tagged[i] = tagged[i + 1] = tagged[i + 2] = tagged[i + 3] = 'Z';
      ++replaced;
    }
  }
  REQUIRE(replaced > 0);
  write_bytes(dir.path() / "zzzz.avi", tagged);
  expect_error<longnet::DataError>([&] { decode_video_file(dir.path() / "zzzz.avi", tiny_video()); },
                                   {"zzzz.avi", "unsupported video codec", "ZZZZ"});
}

TEST_CASE("bad video: absurd dimensions, decoded-bytes cap and timeout", "[bad_media][video]") {
  TempDir dir;
  // Y4M headers claiming 100000×100000 (FFmpeg's own size check refuses it) and 9000×9000 (within FFmpeg's check,
  // beyond max_side), each followed by one small "frame".
  for (const std::string size : {"100000", "9000"}) {
    std::string y4m = "YUV4MPEG2 W" + size + " H" + size + " F30:1 Ip A1:1 C420jpeg\nFRAME\n";
    y4m += std::string(1000, '\x80');
    dir.write("huge" + size + ".y4m", y4m);
  }
  expect_error<longnet::DataError>([&] { decode_video_file(dir.path() / "huge100000.y4m", tiny_video()); },
                                   {"huge100000.y4m", "not a readable media container"});
  expect_error<longnet::DataError>([&] { decode_video_file(dir.path() / "huge9000.y4m", tiny_video()); },
                                   {"huge9000.y4m", "9000x9000", "exceeds the limit of 8192"});

  const auto mp4 = lavfi(dir.path() / "ok.mp4", "testsrc2=size=320x240:rate=10:duration=2", "-c:v libx264");
  VideoOptions o = tiny_video();
  o.max_side = 200;
  expect_error<longnet::DataError>([&] { decode_video_file(mp4, o); }, {"ok.mp4", "320x240"});
  o = tiny_video();
  o.sampling = FrameSampling::all;
  o.max_decoded_bytes = 320 * 240 * 3;  // two yuv420p frames
  expect_error<longnet::DataError>([&] { decode_video_file(mp4, o); }, {"ok.mp4", "max_decoded_bytes"});
  o = tiny_video();
  o.sampling = FrameSampling::all;
  o.max_output_bytes = 16 * 16 * 3 * 5;
  expect_error<longnet::DataError>([&] { decode_video_file(mp4, o); }, {"ok.mp4", "max_output_bytes"});
  o = tiny_video();
  o.timeout_s = 1e-9;
  expect_error<longnet::DataError>([&] { decode_video_file(mp4, o); }, {"ok.mp4", "timed out"});
}

TEST_CASE("bad audio: empty, corrupt, truncated", "[bad_media][audio]") {
  TempDir dir;
  write_bytes(dir.path() / "empty.wav", {});
  expect_error<longnet::DataError>([&] { decode_audio_file(dir.path() / "empty.wav", {}); }, {"empty.wav", "empty"});
  std::vector<uint8_t> noise(2048);
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = static_cast<uint8_t>((i * 40503U) >> 5);
  expect_error<longnet::DataError>([&] { decode_audio_bytes(noise, "noise.bin", {}); }, {"noise.bin"});

  // A truncated mp3 keeps its complete frames; a file cut inside the header has none.
  const auto mp3 = lavfi(dir.path() / "a.mp3", "sine=duration=1", "-c:a libmp3lame");
  const auto bytes = read_bytes(mp3);
  const AudioF32 half = decode_audio_bytes(head(bytes, bytes.size() / 2), "half.mp3", {});
  CHECK(half.samples.size() > 4000);
  CHECK(half.samples.size() < 12000);
  const auto wav = lavfi(dir.path() / "a.wav", "sine=duration=1", "-c:a pcm_s16le");
  expect_error<longnet::DataError>([&] { decode_audio_bytes(head(read_bytes(wav), 30), "cut.wav", {}); },
                                   {"cut.wav"});
}
