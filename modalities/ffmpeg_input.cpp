#include "modalities/ffmpeg_input.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/error.h"

extern "C" {
#include <libavutil/error.h>
#include <libavutil/log.h>
#include <libavutil/mem.h>
}

namespace longnet::modalities::ffmpeg {
namespace {

int interrupt(void* opaque) { return static_cast<const Input*>(opaque)->expired() ? 1 : 0; }

std::chrono::steady_clock::time_point deadline_after(double seconds) {
  const double s = std::clamp(seconds, 0.0, 1e7);
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
}

// Process-wide FFmpeg settings, applied once:
//  - damaged inputs make FFmpeg log at error level on every packet; the caller gets a DataError instead;
//  - a cap on any single allocation: demuxers size tables from header fields before reading them, so a hostile
//    7 KB mp4 made the mov demuxer grow one array to ~1 GB inside avformat_open_input, where the interrupt callback
//    is never asked (found by fuzz/fuzz_video.cpp). The largest legitimate block is a frame plane (8192² × 2 bytes).
void init_ffmpeg() {
  static const bool once = [] {
    if (av_log_get_level() > AV_LOG_FATAL) av_log_set_level(AV_LOG_FATAL);
    av_max_alloc(kMaxAllocationBytes);
    return true;
  }();
  (void)once;
}

}  // namespace

FramePtr make_frame() {
  FramePtr f(av_frame_alloc());
  if (!f) throw std::bad_alloc();
  return f;
}

PacketPtr make_packet() {
  PacketPtr p(av_packet_alloc());
  if (!p) throw std::bad_alloc();
  return p;
}

std::string error_string(int code) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
  av_strerror(code, buf, sizeof buf);
  return buf;
}

Input::Input(const std::filesystem::path& path, double timeout_s)
    : name_(path.string()), deadline_(deadline_after(timeout_s)) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) throw IoError(name_ + ": no such file");
  if (std::filesystem::is_directory(status)) throw IoError(name_ + ": is a directory, not a file");
  // FFmpeg's own message for EACCES is vague; open once here so that the reason is the system's.
  if (std::FILE* f = std::fopen(name_.c_str(), "rb")) {
    std::fclose(f);
  } else {
    throw IoError(name_ + ": cannot open for reading: " + std::strerror(errno));
  }
  if (std::filesystem::file_size(path, ec) == 0 && !ec) throw DataError(name_ + ": empty file");
  open(name_.c_str());
}

Input::Input(std::span<const uint8_t> bytes, std::string name, double timeout_s)
    : name_(std::move(name)), deadline_(deadline_after(timeout_s)), memory_{bytes, 0} {
  if (bytes.empty()) throw DataError(name_ + ": empty file");
  constexpr int kBuffer = 1 << 16;
  auto* buffer = static_cast<unsigned char*>(av_malloc(kBuffer));
  if (!buffer) throw std::bad_alloc();
  auto read = [](void* opaque, uint8_t* buf, int size) -> int {
    auto* m = static_cast<Memory*>(opaque);
    const int64_t left = static_cast<int64_t>(m->bytes.size()) - m->pos;
    const int n = static_cast<int>(std::min<int64_t>(size, left));
    if (n <= 0) return AVERROR_EOF;
    std::memcpy(buf, m->bytes.data() + m->pos, static_cast<size_t>(n));
    m->pos += n;
    return n;
  };
  auto seek = [](void* opaque, int64_t offset, int whence) -> int64_t {
    auto* m = static_cast<Memory*>(opaque);
    const auto size = static_cast<int64_t>(m->bytes.size());
    if (whence & AVSEEK_SIZE) return size;
    int64_t target = 0;
    switch (whence & ~AVSEEK_FORCE) {
      case SEEK_SET: target = offset; break;
      case SEEK_CUR: target = m->pos + offset; break;
      case SEEK_END: target = size + offset; break;
      default: return AVERROR(EINVAL);
    }
    if (target < 0 || target > size) return AVERROR(EINVAL);
    m->pos = target;
    return target;
  };
  avio_ = avio_alloc_context(buffer, kBuffer, 0, &memory_, read, nullptr, seek);
  if (!avio_) {
    av_free(buffer);
    throw std::bad_alloc();
  }
  open(nullptr);
}

void Input::open(const char* url) {
  init_ffmpeg();
  fmt_ = avformat_alloc_context();
  if (!fmt_) {
    close();
    throw std::bad_alloc();
  }
  fmt_->interrupt_callback.callback = interrupt;
  fmt_->interrupt_callback.opaque = this;
  if (avio_) {
    fmt_->pb = avio_;
    fmt_->flags |= AVFMT_FLAG_CUSTOM_IO;
  }
  int ret = avformat_open_input(&fmt_, url ? url : "", nullptr, nullptr);  // frees fmt_ on failure
  if (ret < 0) {
    const std::string reason = expired() ? "timed out while opening" : "not a readable media container";
    close();
    throw DataError(name_ + ": " + reason + ": " + error_string(ret));
  }
  ret = avformat_find_stream_info(fmt_, nullptr);
  if (ret < 0) {
    const std::string msg = name_ + ": " + (expired() ? "timed out" : "cannot read stream information") + ": " +
                            error_string(ret);
    close();
    throw DataError(msg);
  }
}

Input::~Input() { close(); }

void Input::close() {
  if (fmt_) avformat_close_input(&fmt_);
  if (avio_) {
    av_freep(&avio_->buffer);
    avio_context_free(&avio_);
  }
}

void Input::fail(const std::string& reason, int code) const {
  std::string msg = name_ + ": " + (expired() ? "timed out (" + reason + ")" : reason);
  if (code < 0) msg += ": " + error_string(code);
  throw DataError(msg);
}

int Input::find_stream(AVMediaType type) const {
  for (unsigned i = 0; i < fmt_->nb_streams; ++i) {
    const AVStream* st = fmt_->streams[i];
    if (st->codecpar->codec_type == type && !(st->disposition & AV_DISPOSITION_ATTACHED_PIC)) {
      return static_cast<int>(i);
    }
  }
  fail(std::string("no ") + (type == AVMEDIA_TYPE_VIDEO ? "video" : "audio") + " stream");
}

CodecContextPtr Input::open_decoder(int stream_index, int threads, int64_t max_pixels) const {
  const AVStream* st = fmt_->streams[stream_index];
  const AVCodec* codec = avcodec_find_decoder(st->codecpar->codec_id);
  if (!codec) {
    std::string tag;  // the container's codec tag (a fourcc) says more than "none" when FFmpeg knows no such codec
    for (int i = 0; i < 4; ++i) {
      const auto c = static_cast<char>((st->codecpar->codec_tag >> (8 * i)) & 0xFF);
      tag += (c >= 32 && c < 127) ? c : '?';
    }
    fail(std::string("unsupported ") + av_get_media_type_string(st->codecpar->codec_type) + " codec '" +
         avcodec_get_name(st->codecpar->codec_id) + "' (codec tag '" + tag + "')");
  }
  CodecContextPtr ctx(avcodec_alloc_context3(codec));
  if (!ctx) throw std::bad_alloc();
  int ret = avcodec_parameters_to_context(ctx.get(), st->codecpar);
  if (ret < 0) fail("bad codec parameters", ret);
  ctx->pkt_timebase = st->time_base;
  ctx->thread_count = std::max(threads, 0);
  ctx->thread_type = FF_THREAD_FRAME | FF_THREAD_SLICE;
  if (max_pixels > 0) ctx->max_pixels = max_pixels;
  ret = avcodec_open2(ctx.get(), codec, nullptr);
  if (ret < 0) fail(std::string("cannot open the ") + codec->name + " decoder", ret);
  return ctx;
}

}  // namespace longnet::modalities::ffmpeg
