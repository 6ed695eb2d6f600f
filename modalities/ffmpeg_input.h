// Shared FFmpeg plumbing for the video and audio decoders (internal to longnet_media): opening a container from a
// file or from bytes in memory (a custom AVIOContext), a deadline enforced through the interrupt callback, stream
// selection, decoder set-up and RAII owners. Errors are DataError naming the file, or IoError for a missing or
// unreadable file.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/frame.h>
}

namespace longnet::modalities::ffmpeg {

// No single FFmpeg allocation may exceed this (av_max_alloc, process-wide, set when the first input is opened).
inline constexpr size_t kMaxAllocationBytes = size_t{256} << 20;

struct CodecContextFree {
  void operator()(AVCodecContext* c) const { avcodec_free_context(&c); }
};
struct FrameFree {
  void operator()(AVFrame* f) const { av_frame_free(&f); }
};
struct PacketFree {
  void operator()(AVPacket* p) const { av_packet_free(&p); }
};
using CodecContextPtr = std::unique_ptr<AVCodecContext, CodecContextFree>;
using FramePtr = std::unique_ptr<AVFrame, FrameFree>;
using PacketPtr = std::unique_ptr<AVPacket, PacketFree>;

FramePtr make_frame();
PacketPtr make_packet();

// FFmpeg's text for an error code.
std::string error_string(int code);

// An opened container with its stream information read. Not copyable; not thread-safe (one per decode).
class Input {
 public:
  // IoError when the file is missing or unreadable, DataError when it is empty or no container format matches.
  Input(const std::filesystem::path& path, double timeout_s);
  // `bytes` must outlive the Input; `name` is used in messages.
  Input(std::span<const uint8_t> bytes, std::string name, double timeout_s);
  ~Input();
  Input(const Input&) = delete;
  Input& operator=(const Input&) = delete;

  AVFormatContext* format() const { return fmt_; }
  const std::string& name() const { return name_; }

  // Throws DataError "<name>: <reason>[: <FFmpeg's text for code>]"; "timed out" replaces the reason after the deadline.
  [[noreturn]] void fail(const std::string& reason, int code = 0) const;
  bool expired() const { return std::chrono::steady_clock::now() > deadline_; }

  // The first stream of `type` that is not an attached picture (cover art); fails naming the missing kind.
  int find_stream(AVMediaType type) const;
  // A decoder for the stream, opened with `threads` threads (0: FFmpeg's choice) and a pixel cap (video).
  CodecContextPtr open_decoder(int stream_index, int threads, int64_t max_pixels) const;

 private:
  void open(const char* url);
  void close();  // frees what open() or the constructors allocated; safe to call twice

  struct Memory {
    std::span<const uint8_t> bytes;
    int64_t pos = 0;
  };
  std::string name_;
  std::chrono::steady_clock::time_point deadline_;
  AVFormatContext* fmt_ = nullptr;
  AVIOContext* avio_ = nullptr;
  Memory memory_{};
};

}  // namespace longnet::modalities::ffmpeg
