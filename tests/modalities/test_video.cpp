#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/error.h"
#include "modalities/video.h"
#include "tests/modalities/media_fixtures.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

using namespace longnet::modalities;
using longnet::test::counter_clip;
using longnet::test::lavfi;
using longnet::test::TempDir;

namespace {

// Centre pixel (green channel; the clip is grey) of each returned frame.
std::vector<int> centre_values(const VideoFrames& v) {
  std::vector<int> out;
  for (int t = 0; t < v.frames; ++t) {
    const size_t centre = (static_cast<size_t>(t) * v.height * v.width + (v.height / 2) * v.width + v.width / 2) * 3;
    out.push_back(v.pixels[centre + 1]);
  }
  return out;
}

// The counter_clip frame number of returned frame t, by looking its centre value up in the table of all frames.
int frame_number(const VideoFrames& v, int t, const std::vector<int>& table) {
  const int value = centre_values(v)[static_cast<size_t>(t)];
  const auto it = std::find(table.begin(), table.end(), value);
  return it == table.end() ? -1 : static_cast<int>(it - table.begin());
}

VideoOptions small(FrameSampling sampling) {
  VideoOptions o;
  o.sampling = sampling;
  o.height = 48;
  o.width = 64;
  return o;
}

}  // namespace

TEST_CASE("video: every frame, in order, converted to RGB", "[video]") {
  TempDir dir;
  const auto clip = counter_clip(dir.path() / "c.mp4", 4.0, 30);
  const VideoFrames v = decode_video_file(clip, small(FrameSampling::all));
  REQUIRE(v.frames == 120);
  CHECK(v.height == 48);
  CHECK(v.width == 64);
  CHECK(v.pixels.size() == 120u * 48u * 64u * 3u);
  CHECK(v.info.codec == "h264");
  CHECK(v.info.duration_s == Approx(4.0).margin(0.05));
  CHECK(v.info.frame_rate == Approx(30.0));
  const std::vector<int> values = centre_values(v);
  for (int t = 0; t < 120; ++t) {
    INFO("frame " << t);
    // Limited-range luma y becomes RGB (y - 16)·255/219.
    CHECK(values[t] == Approx((std::floor(16 + 1.8 * t) - 16) * 255.0 / 219.0).margin(1.5));
    if (t > 0) CHECK(values[t] > values[t - 1]);  // every frame distinct, in order
    CHECK(v.timestamps_s[t] == Approx(t / 30.0).margin(1e-6));
  }
}

TEST_CASE("video: fps and uniform sampling pick the frames showing the target times", "[video]") {
  TempDir dir;
  const auto clip = counter_clip(dir.path() / "c.mp4", 4.0, 30);
  const std::vector<int> table = centre_values(decode_video_file(clip, small(FrameSampling::all)));
  REQUIRE(table.size() == 120);
  SECTION("1 fps: t = 0, 1, 2, 3") {
    VideoOptions o = small(FrameSampling::fps);
    const VideoFrames v = decode_video_file(clip, o);
    REQUIRE(v.frames == 4);
    for (int t = 0; t < 4; ++t) CHECK(frame_number(v, t, table) == 30 * t);
  }
  SECTION("3 fps") {
    VideoOptions o = small(FrameSampling::fps);
    o.fps = 3.0;
    const VideoFrames v = decode_video_file(clip, o);
    REQUIRE(v.frames == 12);
    for (int t = 0; t < 12; ++t) CHECK(frame_number(v, t, table) == 10 * t);
  }
  SECTION("uniform: t = (i + 0.5)·4/5") {
    VideoOptions o = small(FrameSampling::uniform);
    o.num_frames = 5;
    const VideoFrames v = decode_video_file(clip, o);
    REQUIRE(v.frames == 5);
    // 0.4 s → frame 12, 1.2 s → 36, 2.0 s → 60, 2.8 s → 84, 3.6 s → 108 (frame N shows [N/30, (N+1)/30)).
    const std::vector<int> expect{12, 36, 60, 84, 108};
    for (int t = 0; t < 5; ++t) {
      CHECK(frame_number(v, t, table) == expect[t]);
      CHECK(v.timestamps_s[t] == Approx(expect[t] / 30.0).margin(1e-6));
    }
  }
  SECTION("more samples than frames repeat frames") {
    VideoOptions o = small(FrameSampling::fps);
    o.fps = 60.0;
    const VideoFrames v = decode_video_file(clip, o);
    REQUIRE(v.frames == 240);
    CHECK(frame_number(v, 0, table) == 0);
    CHECK(frame_number(v, 1, table) == 0);
    CHECK(frame_number(v, 239, table) == 119);
  }
}

TEST_CASE("video: seeking and skipping unreferenced frames return the same frames as decoding everything", "[video]") {
  TempDir dir;
  // Keyframes every 15 frames; 1 fps sampling skips from each target to the keyframe before the next one.
  const auto mp4 = counter_clip(dir.path() / "c.mp4", 4.0, 15);
  const auto ts = counter_clip(dir.path() / "c.ts", 4.0, 15);  // MPEG-TS: no keyframe index, seeks by gap
  for (const auto& clip : {mp4, ts}) {
    INFO(clip.string());
    const std::vector<int> table = centre_values(decode_video_file(clip, small(FrameSampling::all)));
    REQUIRE(table.size() == 120);
    for (const double fps : {1.0, 7.0}) {
      INFO("fps " << fps);
      VideoOptions plain = small(FrameSampling::fps);
      plain.fps = fps;
      plain.seek = false;
      plain.skip_nonref = false;
      VideoOptions fast = plain;
      fast.seek = true;
      fast.skip_nonref = true;
      fast.seek_gap_s = 0.5;
      const VideoFrames a = decode_video_file(clip, plain);
      const VideoFrames b = decode_video_file(clip, fast);
      REQUIRE(a.frames == b.frames);
      CHECK(a.timestamps_s == b.timestamps_s);
      CHECK(a.pixels == b.pixels);
      CHECK(a.stats.seeks == 0);
      if (fps == 1.0) {
        CHECK(b.stats.seeks >= 2);
        CHECK(b.stats.frames_decoded < a.stats.frames_decoded / 2);
        for (int t = 0; t < b.frames; ++t) CHECK(frame_number(b, t, table) == 30 * t);
      } else {
        CHECK(b.stats.frames_decoded < a.stats.frames_decoded);  // unreferenced B-frames were dropped
      }
    }
  }
}

TEST_CASE("video: decoder threads do not change the output", "[video]") {
  TempDir dir;
  const auto clip = counter_clip(dir.path() / "c.mp4", 2.0, 30);
  VideoOptions one = small(FrameSampling::all);
  one.threads = 1;
  VideoOptions three = one;
  three.threads = 3;
  const VideoFrames a = decode_video_file(clip, one);
  const VideoFrames b = decode_video_file(clip, three);
  CHECK(a.frames == 60);
  CHECK(a.pixels == b.pixels);
}

TEST_CASE("video: with decoder threads, frames arrive in order and a failing callback stops the decoding", "[video]") {
  TempDir dir;
  const auto clip = counter_clip(dir.path() / "c.mp4", 2.0, 30);
  VideoOptions o = small(FrameSampling::all);
  o.threads = 2;  // every frame with several threads: decoding runs on its own thread
  std::vector<int64_t> indices;
  std::vector<double> times;
  const VideoDecodeStats stats = for_each_video_frame(clip, o, [&](const FrameView& f) {
    indices.push_back(f.index);
    times.push_back(f.timestamp_s);
  });
  REQUIRE(indices.size() == 60);
  CHECK(stats.frames_returned == 60);
  for (size_t i = 0; i < indices.size(); ++i) CHECK(indices[i] == static_cast<int64_t>(i));
  CHECK(std::is_sorted(times.begin(), times.end()));

  // The callback's exception reaches the caller, no later frame is delivered, and nothing hangs.
  int delivered = 0;
  CHECK_THROWS_WITH(for_each_video_frame(clip, o,
                                         [&](const FrameView&) {
                                           if (++delivered == 5) throw std::runtime_error("stop at five");
                                         }),
                    "stop at five");
  CHECK(delivered == 5);
}

TEST_CASE("video: bytes in memory decode like the file", "[video]") {
  TempDir dir;
  const auto clip = counter_clip(dir.path() / "c.mkv", 2.0, 30);
  VideoOptions o = small(FrameSampling::uniform);
  o.num_frames = 3;
  const auto bytes = longnet::test::read_bytes(clip);
  const VideoFrames a = decode_video_file(clip, o);
  const VideoFrames b = decode_video_bytes(bytes, "memory.mkv", o);
  REQUIRE(a.frames == 3);
  CHECK(a.pixels == b.pixels);
  CHECK(a.timestamps_s == b.timestamps_s);
}

TEST_CASE("video: conversion to RGB at the target size, with exact and centre-crop resizing", "[video]") {
  TempDir dir;
  // 80×40: left half red, right half blue.
  const auto clip = lavfi(dir.path() / "rb.mp4", "color=c=red:size=80x40:rate=10:duration=1",
                          "-vf drawbox=x=40:y=0:w=40:h=40:color=blue:t=fill -c:v libx264 -qp 1 -pix_fmt yuv444p");
  auto at = [](const VideoFrames& v, int y, int x) {
    const size_t i = (static_cast<size_t>(y) * v.width + x) * 3;
    return std::array<int, 3>{v.pixels[i], v.pixels[i + 1], v.pixels[i + 2]};
  };
  VideoOptions o;
  o.sampling = FrameSampling::uniform;
  o.num_frames = 1;
  o.height = 16;
  o.width = 32;
  o.resize = ResizePolicy::exact;
  const VideoFrames exact = decode_video_file(clip, o);
  REQUIRE(exact.frames == 1);
  CHECK(exact.height == 16);
  CHECK(exact.width == 32);
  const auto red = at(exact, 8, 4), blue = at(exact, 8, 28);
  CHECK(red[0] >= 245);
  CHECK(red[2] <= 10);
  CHECK(blue[2] >= 245);
  CHECK(blue[0] <= 10);

  o.resize = ResizePolicy::shorter_center_crop;
  o.height = 20;
  o.width = 20;
  const VideoFrames crop = decode_video_file(clip, o);
  // The centre 40×40 of the source: columns 20..59, red on the left half, blue on the right.
  CHECK(at(crop, 10, 2)[0] >= 245);
  CHECK(at(crop, 10, 17)[2] >= 245);

  o.resize = ResizePolicy::none;
  const VideoFrames native = decode_video_file(clip, o);
  CHECK(native.height == 40);
  CHECK(native.width == 80);
}

TEST_CASE("video: 4:2:0 frames convert close to a high-quality resampler", "[video]") {
  TempDir dir;
  // Sharp colour pattern; 1282×722 makes the 2×2-averaged planes odd-sized (641×361, chroma 321×181).
  const auto clip = lavfi(dir.path() / "big.mp4", "testsrc2=size=1282x722:rate=10:duration=0.1",
                          "-c:v libx264 -qp 0 -pix_fmt yuv420p");
  auto reference = [&](const std::string& filter, const std::string& flags) {
    const auto raw = dir.path() / "ref.rgb";
    longnet::test::run_command("ffmpeg -nostdin -v error -y -i \"" + clip.string() + "\" -frames:v 1 -vf " +
                               filter + ":flags=" + flags + " -pix_fmt rgb24 -f rawvideo \"" + raw.string() + "\"");
    return longnet::test::read_bytes(raw);
  };
  auto psnr = [](const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
    double se = 0;
    for (size_t i = 0; i < a.size(); ++i) se += std::pow(static_cast<double>(a[i]) - b[i], 2);
    return 10 * std::log10(255.0 * 255.0 / (se / static_cast<double>(a.size())));
  };
  struct Case {
    ResizePolicy resize;
    int height, width;
    std::string filter;
  };
  const std::vector<Case> cases = {
      {ResizePolicy::exact, 60, 100, "format=yuv444p,scale=100:60"},  // two averaging steps, width not a multiple of 8
      {ResizePolicy::shorter_center_crop, 224, 224, "crop=722:722,format=yuv444p,scale=224:224"},
      {ResizePolicy::exact, 300, 640, "format=yuv444p,scale=640:300"},  // no averaging step
      {ResizePolicy::exact, 61, 101, "format=yuv444p,scale=101:61"},    // odd output size
  };
  for (const Case& c : cases) {
    INFO(c.filter);
    VideoOptions o;
    o.sampling = FrameSampling::all;  // the clip has one frame
    o.resize = c.resize;
    o.height = c.height;
    o.width = c.width;
    const VideoFrames ours = decode_video_file(clip, o);
    REQUIRE(ours.frames == 1);
    const std::vector<uint8_t> best = reference(c.filter, "lanczos+accurate_rnd+full_chroma_int+full_chroma_inp");
    const std::string plain = c.filter.substr(0, c.filter.find("format=")) + c.filter.substr(c.filter.find("scale="));
    const std::vector<uint8_t> bilinear = reference(plain, "bilinear");
    REQUIRE(best.size() == ours.pixels.size());
    REQUIRE(bilinear.size() == ours.pixels.size());
    const double ours_db = psnr(ours.pixels, best), bilinear_db = psnr(bilinear, best);
    INFO("PSNR against lanczos with full chroma: ours " << ours_db << " dB, ffmpeg bilinear " << bilinear_db << " dB");
    // ffmpeg's bilinear RGB output subsamples chroma at even sizes (7–14 dB behind here); at odd sizes it
    // interpolates chroma fully and its triangle filter, spanning the whole 12× reduction, is ~4 dB ahead of
    // 2×2 averaging followed by a 3× bilinear step.
    CHECK(ours_db > 28.0);
    CHECK(ours_db > bilinear_db - 4.5);
  }
}

TEST_CASE("video: clips sample windows spread over the stream", "[video]") {
  TempDir dir;
  const auto clip = counter_clip(dir.path() / "c.mp4", 4.0, 30);
  std::vector<int> table = centre_values(decode_video_file(clip, small(FrameSampling::all)));
  VideoOptions o = small(FrameSampling::uniform);
  o.num_frames = 3;
  o.clip_seconds = 1.0;
  o.clips = 2;
  for (o.clip = 0; o.clip < 2; ++o.clip) {
    const VideoFrames v = decode_video_file(clip, o);
    REQUIRE(v.frames == 3);
    // Windows [0, 1) and [D - 1, D): frames at a + (i + 0.5)/3 s.
    const double a = o.clip == 0 ? 0.0 : v.info.duration_s - 1.0;
    for (int t = 0; t < 3; ++t) {
      INFO("clip " << o.clip << " frame " << t);
      CHECK(frame_number(v, t, table) == static_cast<int>(std::floor((a + (t + 0.5) / 3) * 30 + 1e-9)));
    }
  }
  // One clip: the centred window.
  o.clips = 1;
  o.clip = 0;
  o.clip_seconds = 2.0;
  const VideoFrames centred = decode_video_file(clip, o);
  const double a = (centred.info.duration_s - 2.0) / 2;
  for (int t = 0; t < 3; ++t) {
    CHECK(frame_number(centred, t, table) == static_cast<int>(std::floor((a + (t + 0.5) * 2 / 3) * 30 + 1e-9)));
  }
  // No clip length and several clips: consecutive quarters at 1 frame/s.
  o.sampling = FrameSampling::fps;
  o.fps = 1.0;
  o.clip_seconds = 0.0;
  o.clips = 4;
  o.clip = 2;
  const VideoFrames quarter = decode_video_file(clip, o);
  REQUIRE(quarter.frames == 1);
  CHECK(frame_number(quarter, 0, table) == static_cast<int>(std::floor(2 * quarter.info.duration_s / 4 * 30 + 1e-9)));
  o.clip = 4;
  CHECK_THROWS_AS(decode_video_file(clip, o), longnet::ConfigError);
}

TEST_CASE("video: streaming callback and tubelet patches", "[video][patchify]") {
  TempDir dir;
  const auto clip = counter_clip(dir.path() / "c.mp4", 2.0, 30);
  VideoOptions o = small(FrameSampling::uniform);
  o.num_frames = 5;
  o.height = 32;
  o.width = 32;
  std::vector<double> seen;
  VideoInfo info;
  const VideoDecodeStats stats =
      for_each_video_frame(clip, o, [&](const FrameView& f) { seen.push_back(f.timestamp_s); }, &info);
  CHECK(seen.size() == 5);
  CHECK(stats.frames_returned == 5);
  CHECK(info.width == 64);

  const VideoFrames v = decode_video_file(clip, o);
  const Patches p = patchify_video(v, {0.5F, 0.5F, 0.5F}, {0.5F, 0.5F, 0.5F}, 16, 2);
  CHECK(p.grid == std::array<int64_t, 3>{3, 2, 2});  // 5 frames → 3 tubelets, the last repeating frame 4
  CHECK(p.count == 12);
  CHECK(p.dim == 2 * 16 * 16 * 3);
  REQUIRE(p.values.size() == static_cast<size_t>(p.count * p.dim));
  // Last patch: tubelet 2, y 1, x 1.
  CHECK(std::vector<int64_t>(p.positions.end() - 3, p.positions.end()) == std::vector<int64_t>{2, 1, 1});
  // Its two time slices are both frame 4 (repeated).
  const auto last = p.values.end() - p.dim;
  CHECK(std::vector<float>(last, last + p.dim / 2) == std::vector<float>(last + p.dim / 2, p.values.end()));
  // First value of patch 0 = normalised pixel (0, 0, 0) of frame 0.
  CHECK(p.values[0] == Approx((v.pixels[0] / 255.0 - 0.5) / 0.5));
  CHECK(parse_frame_sampling("fps") == FrameSampling::fps);
  CHECK_THROWS_AS(parse_frame_sampling("every"), longnet::ConfigError);
}
