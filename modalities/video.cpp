#include "modalities/video.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "modalities/ffmpeg_input.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

extern "C" {
#include <libavutil/imgutils.h>
#include <libavutil/pixdesc.h>
#include <libswscale/swscale.h>
}

namespace longnet::modalities {
namespace {

using ffmpeg::Input;

struct SwsFree {
  void operator()(SwsContext* s) const { sws_freeContext(s); }
};

// Decoded frames on their way from the decoding thread to the converting one (FrameSampling::all with several decoder
// threads, see VideoDecoder::run). Bounded: decoding runs at most kCapacity frames ahead of the conversion.
class FrameQueue {
 public:
  struct Item {
    ffmpeg::FramePtr frame;
    int64_t pts = 0;
  };
  struct Stopped {};  // thrown into the decoding thread when the consumer has given up

  // Blocks while the queue is full; throws Stopped once the consumer has stopped.
  void push(ffmpeg::FramePtr frame, int64_t pts) {
    std::unique_lock lock(mutex_);
    not_full_.wait(lock, [&] { return items_.size() < kCapacity || stopped_; });
    if (stopped_) throw Stopped{};
    items_.push_back({std::move(frame), pts});
    not_empty_.notify_one();
  }
  // The decoding thread has finished; `error` (may be null) is rethrown to the consumer after the queued frames.
  void close(std::exception_ptr error) {
    const std::lock_guard lock(mutex_);
    closed_ = true;
    error_ = std::move(error);
    not_empty_.notify_one();
  }
  // The consumer gives up: pending frames are dropped and the producer's next push throws Stopped.
  void stop() {
    const std::lock_guard lock(mutex_);
    stopped_ = true;
    items_.clear();
    not_full_.notify_one();
  }
  // The next frame; false at the end. Rethrows the decoding thread's error.
  bool pop(Item& out) {
    std::unique_lock lock(mutex_);
    not_empty_.wait(lock, [&] { return !items_.empty() || closed_; });
    if (items_.empty()) {
      if (error_) std::rethrow_exception(error_);
      return false;
    }
    out = std::move(items_.front());
    items_.pop_front();
    not_full_.notify_one();
    return true;
  }

 private:
  static constexpr size_t kCapacity = 3;
  std::mutex mutex_;
  std::condition_variable not_full_, not_empty_;
  std::deque<Item> items_;
  bool closed_ = false, stopped_ = false;
  std::exception_ptr error_;
};

// BT.601 limited range to RGB for one row of 4:4:4 samples, the coefficients libswscale uses by default (16.8 fixed
// point).
void yuv_to_rgb_scalar(const uint8_t* py, const uint8_t* pu, const uint8_t* pv, uint8_t* rgb, int from, int n) {
  auto to_byte = [](int v) { return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v)); };
  for (int x = from; x < n; ++x) {
    const int c = 298 * (py[x] - 16) + 128, d = pu[x] - 128, e = pv[x] - 128;
    rgb[3 * x] = to_byte((c + 409 * e) >> 8);
    rgb[3 * x + 1] = to_byte((c - 100 * d - 208 * e) >> 8);
    rgb[3 * x + 2] = to_byte((c + 516 * d) >> 8);
  }
}

#if defined(__x86_64__) || defined(__i386__)
// Shuffles that interleave 16 R, G and B bytes into 48: byte k of output vector j takes channel (16j + k) mod 3 of
// pixel (16j + k) / 3 (index −1 gives zero).
constexpr auto kInterleave = [] {
  std::array<std::array<std::array<int8_t, 16>, 3>, 3> m{};
  for (int j = 0; j < 3; ++j) {
    for (int channel = 0; channel < 3; ++channel) {
      for (int k = 0; k < 16; ++k) {
        m[j][channel][k] = (16 * j + k) % 3 == channel ? static_cast<int8_t>((16 * j + k) / 3) : int8_t{-1};
      }
    }
  }
  return m;
}();

// The same, 16 pixels at a time: pairs of 16-bit terms multiplied and summed into 32 bits (saturating packs clamp),
// then one byte shuffle per output vector interleaves R, G and B. SSSE3 for the shuffle, chosen at run time.
__attribute__((target("ssse3"))) void yuv_to_rgb_ssse3(const uint8_t* py, const uint8_t* pu, const uint8_t* pv,
                                                       uint8_t* rgb, int n) {
  const __m128i zero = _mm_setzero_si128(), k16 = _mm_set1_epi16(16), k128 = _mm_set1_epi16(128);
  const __m128i round = _mm_set1_epi32(128);
  const __m128i ce_r = _mm_setr_epi16(298, 409, 298, 409, 298, 409, 298, 409);
  const __m128i cd_g = _mm_setr_epi16(298, -100, 298, -100, 298, -100, 298, -100);
  const __m128i e0_g = _mm_setr_epi16(-208, 0, -208, 0, -208, 0, -208, 0);
  const __m128i cd_b = _mm_setr_epi16(298, 516, 298, 516, 298, 516, 298, 516);
  auto sums_to_16 = [&](__m128i lo, __m128i hi) {  // two halves of 4 int32 sums → 8 int16
    return _mm_packs_epi32(_mm_srai_epi32(_mm_add_epi32(lo, round), 8), _mm_srai_epi32(_mm_add_epi32(hi, round), 8));
  };
  // Eight pixels (16-bit terms c, d, e) → eight 16-bit values per channel.
  auto eight = [&](__m128i c, __m128i d, __m128i e, __m128i& r, __m128i& g, __m128i& b) {
    const __m128i ce_lo = _mm_unpacklo_epi16(c, e), ce_hi = _mm_unpackhi_epi16(c, e);
    const __m128i cd_lo = _mm_unpacklo_epi16(c, d), cd_hi = _mm_unpackhi_epi16(c, d);
    const __m128i e0_lo = _mm_unpacklo_epi16(e, zero), e0_hi = _mm_unpackhi_epi16(e, zero);
    r = sums_to_16(_mm_madd_epi16(ce_lo, ce_r), _mm_madd_epi16(ce_hi, ce_r));
    g = sums_to_16(_mm_add_epi32(_mm_madd_epi16(cd_lo, cd_g), _mm_madd_epi16(e0_lo, e0_g)),
                   _mm_add_epi32(_mm_madd_epi16(cd_hi, cd_g), _mm_madd_epi16(e0_hi, e0_g)));
    b = sums_to_16(_mm_madd_epi16(cd_lo, cd_b), _mm_madd_epi16(cd_hi, cd_b));
  };
  auto mask = [](int j, int channel) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(kInterleave[j][channel].data()));
  };
  const __m128i m[3][3] = {{mask(0, 0), mask(0, 1), mask(0, 2)},
                           {mask(1, 0), mask(1, 1), mask(1, 2)},
                           {mask(2, 0), mask(2, 1), mask(2, 2)}};
  int x = 0;
  for (; x + 16 <= n; x += 16) {
    auto load = [&](const uint8_t* p, __m128i offset, __m128i& lo, __m128i& hi) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + x));
      lo = _mm_sub_epi16(_mm_unpacklo_epi8(v, zero), offset);
      hi = _mm_sub_epi16(_mm_unpackhi_epi8(v, zero), offset);
    };
    __m128i c0, c1, d0, d1, e0, e1, r0, r1, g0, g1, b0, b1;
    load(py, k16, c0, c1);
    load(pu, k128, d0, d1);
    load(pv, k128, e0, e1);
    eight(c0, d0, e0, r0, g0, b0);
    eight(c1, d1, e1, r1, g1, b1);
    const __m128i r = _mm_packus_epi16(r0, r1), g = _mm_packus_epi16(g0, g1), b = _mm_packus_epi16(b0, b1);
    for (int j = 0; j < 3; ++j) {
      const __m128i v = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(r, m[j][0]), _mm_shuffle_epi8(g, m[j][1])),
                                     _mm_shuffle_epi8(b, m[j][2]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(rgb + 3 * x + 16 * j), v);
    }
  }
  yuv_to_rgb_scalar(py, pu, pv, rgb, x, n);
}

#endif

// SSSE3 where the CPU has it (decided once): the byte shuffles interleave in one step what a scalar loop spent most of
// the conversion's time on.
void yuv_to_rgb(const uint8_t* py, const uint8_t* pu, const uint8_t* pv, uint8_t* rgb, int n) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool have_ssse3 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("ssse3") != 0;
  }();
  if (have_ssse3) return yuv_to_rgb_ssse3(py, pu, pv, rgb, n);
#endif
  yuv_to_rgb_scalar(py, pu, pv, rgb, 0, n);
}

class VideoDecoder {
 public:
  VideoDecoder(Input& in, const VideoOptions& opt) : in_(in), opt_(opt) {
    fmt_ = in.format();
    stream_ = in.find_stream(AVMEDIA_TYPE_VIDEO);
    st_ = fmt_->streams[stream_];
    const AVCodecParameters* par = st_->codecpar;
    if (par->width > opt.max_side || par->height > opt.max_side) {
      in.fail("frame size " + std::to_string(par->width) + "x" + std::to_string(par->height) +
              " exceeds the limit of " + std::to_string(opt.max_side) + " per side");
    }
    ctx_ = in.open_decoder(stream_, opt.threads, int64_t{opt.max_side} * opt.max_side);
    tb_ = st_->time_base;
    start_ = st_->start_time != AV_NOPTS_VALUE ? st_->start_time : 0;
    AVRational rate = st_->avg_frame_rate.num > 0 ? st_->avg_frame_rate : st_->r_frame_rate;
    if (rate.num <= 0 || rate.den <= 0) rate = AVRational{25, 1};
    frame_dur_ = std::max<int64_t>(1, av_rescale_q(1, av_inv_q(rate), tb_));
    info_.width = par->width;
    info_.height = par->height;
    info_.frame_rate = av_q2d(rate);
    info_.codec = avcodec_get_name(par->codec_id);
    if (st_->duration != AV_NOPTS_VALUE && st_->duration > 0) {
      duration_ = st_->duration;
    } else if (fmt_->duration != AV_NOPTS_VALUE && fmt_->duration > 0) {
      duration_ = av_rescale_q(fmt_->duration, AV_TIME_BASE_Q, tb_);
    }
    info_.duration_s = static_cast<double>(duration_) * av_q2d(tb_);
    // Only an index present after opening lists every keyframe (mp4); generic seeking adds entries as it goes
    // (MPEG-TS), and those must not be mistaken for the complete list.
    has_index_ = avformat_index_get_entries_count(st_) > 0;
  }

  const VideoInfo& info() const { return info_; }

  VideoDecodeStats run(const FrameCallback& on_frame) {
    on_frame_ = &on_frame;
    if (opt_.sampling != FrameSampling::all) {
      if (duration_ <= 0) duration_ = scan_duration();
      make_targets();
    }
    pkt_ = ffmpeg::make_packet();
    frame_ = ffmpeg::make_frame();
    last_ = ffmpeg::make_frame();
    position_ = start_;
    if (const AVIndexEntry* first = avformat_index_get_entry(st_, 0)) position_ = first->timestamp;

    // Every frame with several decoder threads: this thread converts while another drives the decoder. With frame
    // threading the decoder hands out a frame when its oldest worker finishes, and that worker idles until the next
    // packet arrives, so converting in between idled a worker for every frame (1080p on 2 threads, median of 5
    // interleaved runs: 1.35× ffmpeg's time that way, 1.25× this way; bench/bench_decode.cpp).
    if (opt_.sampling == FrameSampling::all && opt_.threads != 1) {
      decode_on_own_thread();
    } else {
      decode();
    }
    if (stats_.frames_returned == 0) {
      in_.fail(stats_.frames_decoded == 0 ? "no decodable video frames" : "no frame matched the sampling");
    }
    return stats_;
  }

 private:
  void decode_on_own_thread() {
    FrameQueue queue;
    queue_ = &queue;
    std::thread decoding([&] {
      std::exception_ptr error;
      try {
        decode();
      } catch (const FrameQueue::Stopped&) {
      } catch (...) {
        error = std::current_exception();
      }
      queue.close(error);
    });
    try {
      FrameQueue::Item item;
      while (queue.pop(item)) {
        deliver(item.frame.get(), item.pts);
        item.frame.reset();
      }
    } catch (...) {
      queue.stop();
      decoding.join();
      queue_ = nullptr;
      throw;
    }
    decoding.join();
    queue_ = nullptr;
  }

  // Demuxes and decodes until the sampling is satisfied or the stream ends; each chosen frame goes to emit().
  void decode() {
    bool eof = false;
    while (!done()) {
      if (in_.expired()) in_.fail("decoding took longer than the timeout");
      maybe_seek();
      const int ret = av_read_frame(fmt_, pkt_.get());
      if (ret < 0) {
        if (ret == AVERROR_EXIT) in_.fail("reading packets", ret);
        eof = true;  // end of file, or damaged data at the end: decode what was read
        break;
      }
      if (pkt_->stream_index == stream_) send(pkt_.get());
      av_packet_unref(pkt_.get());
    }
    if (eof && !done()) {
      ctx_->skip_frame = AVDISCARD_DEFAULT;
      send(nullptr);
      // Targets past the last frame (a duration that overstates the stream) get the last frame.
      while (opt_.sampling != FrameSampling::all && !done() && last_->data[0]) emit(last_.get(), last_pts_);
    }
  }

  bool done() const {
    return opt_.sampling != FrameSampling::all && next_ >= targets_.size();
  }

  // Demuxes the whole file once for the last timestamp (raw streams carry no duration), then rewinds.
  int64_t scan_duration() {
    auto pkt = ffmpeg::make_packet();
    int64_t end = 0;
    while (av_read_frame(fmt_, pkt.get()) >= 0) {
      if (pkt->stream_index == stream_ && pkt->pts != AV_NOPTS_VALUE) {
        end = std::max(end, pkt->pts - start_ + std::max<int64_t>(pkt->duration, frame_dur_));
      }
      av_packet_unref(pkt.get());
      if (in_.expired()) in_.fail("scanning for the duration took longer than the timeout");
    }
    if (end <= 0) in_.fail("the stream has no timestamps, cannot sample frames by time");
    if (av_seek_frame(fmt_, stream_, start_, AVSEEK_FLAG_BACKWARD) < 0 &&
        avformat_seek_file(fmt_, stream_, std::numeric_limits<int64_t>::min(), start_, start_, 0) < 0) {
      in_.fail("cannot rewind after scanning for the duration");
    }
    info_.duration_s = static_cast<double>(end) * av_q2d(tb_);
    return end;
  }

  void make_targets() {
    const double whole = static_cast<double>(duration_) * av_q2d(tb_);
    // The sampled window [start, start + dur) (VideoOptions: clips).
    double dur = whole, start = 0.0;
    if (opt_.clip_seconds > 0.0 || opt_.clips > 1) {
      dur = opt_.clip_seconds > 0.0 ? std::min(opt_.clip_seconds, whole) : whole / opt_.clips;
      start = opt_.clips == 1 ? (whole - dur) / 2 : opt_.clip * (whole - dur) / (opt_.clips - 1);
    }
    std::vector<double> seconds;
    if (opt_.sampling == FrameSampling::uniform) {
      for (int i = 0; i < opt_.num_frames; ++i) seconds.push_back(start + (i + 0.5) * dur / opt_.num_frames);
    } else {
      const auto n = static_cast<int64_t>(std::ceil(dur * opt_.fps - 1e-9));
      const int64_t max_frames = opt_.max_output_bytes / (int64_t{3} * std::max(1, opt_.height) * std::max(1, opt_.width));
      if (n > max_frames) {
        in_.fail(std::to_string(n) + " frames at " + std::to_string(opt_.fps) + " fps exceed max_output_bytes");
      }
      for (int64_t i = 0; i < std::max<int64_t>(n, 1); ++i) seconds.push_back(start + static_cast<double>(i) / opt_.fps);
    }
    for (double s : seconds) targets_.push_back(start_ + static_cast<int64_t>(std::floor(s / av_q2d(tb_))));
  }

  // Seeks when the keyframe before the next target lies after everything already given to the decoder.
  void maybe_seek() {
    if (!opt_.seek || opt_.sampling == FrameSampling::all || next_ >= targets_.size() || checked_ == next_) return;
    checked_ = next_;
    const int64_t target = targets_[next_];
    // Index timestamps are decode times; back off a few frames so that reordering cannot put the keyframe's
    // presentation after the target.
    const int64_t lookup = target - 4 * frame_dur_;
    bool seek = false;
    if (has_index_) {
      const AVIndexEntry* kf = avformat_index_get_entry_from_timestamp(st_, lookup, AVSEEK_FLAG_BACKWARD);
      seek = kf && kf->timestamp > position_;
    } else {
      seek = static_cast<double>(target - position_) * av_q2d(tb_) > opt_.seek_gap_s;
    }
    if (!seek) return;
    if (av_seek_frame(fmt_, stream_, lookup, AVSEEK_FLAG_BACKWARD) < 0) return;  // decode forward instead
    avcodec_flush_buffers(ctx_.get());
    ++stats_.seeks;
    position_ = lookup;
  }

  void send(AVPacket* pkt) {
    if (pkt) {
      const int64_t t = pkt->dts != AV_NOPTS_VALUE ? pkt->dts : pkt->pts;
      if (t != AV_NOPTS_VALUE) position_ = std::max(position_, t);
      // A frame that ends before the next target can never be returned; the decoder may skip it unless it is a
      // reference for others.
      const bool skippable = opt_.skip_nonref && opt_.sampling != FrameSampling::all && next_ < targets_.size() &&
                             pkt->pts != AV_NOPTS_VALUE &&
                             pkt->pts + std::max<int64_t>(pkt->duration, frame_dur_) <= targets_[next_];
      ctx_->skip_frame = skippable ? AVDISCARD_NONREF : AVDISCARD_DEFAULT;
      ++stats_.packets_sent;
    }
    int ret = avcodec_send_packet(ctx_.get(), pkt);
    if (ret < 0 && ret != AVERROR_EOF) {
      if (ret == AVERROR(ENOMEM)) in_.fail("out of memory while decoding", ret);
      if (++bad_packets_ > 1000) in_.fail("too many undecodable packets", ret);
      return;  // a damaged packet: the decoder conceals, keep going
    }
    while (!done() || opt_.sampling == FrameSampling::all) {
      ret = avcodec_receive_frame(ctx_.get(), frame_.get());
      if (ret == AVERROR(EAGAIN) || ret == AVERROR_EOF) break;
      if (ret < 0) {
        if (++bad_packets_ > 1000) in_.fail("too many undecodable frames", ret);
        break;
      }
      on_decoded(frame_.get());
      av_frame_unref(frame_.get());
    }
  }

  void on_decoded(AVFrame* f) {
    ++stats_.frames_decoded;
    if (f->width <= 0 || f->height <= 0 || f->width > opt_.max_side || f->height > opt_.max_side) {
      in_.fail("decoded frame size " + std::to_string(f->width) + "x" + std::to_string(f->height) +
               " is outside the limit of " + std::to_string(opt_.max_side) + " per side");
    }
    const int bytes = av_image_get_buffer_size(static_cast<AVPixelFormat>(f->format), f->width, f->height, 1);
    decoded_bytes_ += std::max(bytes, 0);
    if (decoded_bytes_ > opt_.max_decoded_bytes) {
      in_.fail("decoded more than max_decoded_bytes (" + std::to_string(opt_.max_decoded_bytes) + ")");
    }
    int64_t pts = f->best_effort_timestamp;
    if (pts == AV_NOPTS_VALUE) pts = last_pts_ == AV_NOPTS_VALUE ? start_ : last_pts_ + frame_dur_;
    const int64_t dur = f->pkt_duration > 0 ? f->pkt_duration : frame_dur_;
    if (opt_.sampling == FrameSampling::all) {
      emit(f, pts);
    } else {
      while (next_ < targets_.size() && targets_[next_] < pts + dur) emit(f, pts);
    }
    av_frame_unref(last_.get());
    if (av_frame_ref(last_.get(), f) < 0) in_.fail("out of memory while keeping a frame");
    last_pts_ = pts;
  }

  void emit(AVFrame* f, int64_t pts) {
    if (queue_ != nullptr) {  // decoding on its own thread: the caller's thread converts and delivers
      auto ref = ffmpeg::make_frame();
      if (av_frame_ref(ref.get(), f) < 0) in_.fail("out of memory while queueing a frame");
      queue_->push(std::move(ref), pts);
      return;
    }
    deliver(f, pts);
  }

  // Converts the frame and passes it to the callback.
  void deliver(AVFrame* f, int64_t pts) {
    convert(f);
    FrameView view{stats_.frames_returned, static_cast<double>(pts - start_) * av_q2d(tb_), out_h_, out_w_,
                   rgb_.data()};
    ++stats_.frames_returned;
    if (opt_.sampling != FrameSampling::all) ++next_;
    (*on_frame_)(view);
  }

  void convert(AVFrame* f) {
    if (out_h_ == 0) {
      out_h_ = opt_.resize == ResizePolicy::none ? f->height : opt_.height;
      out_w_ = opt_.resize == ResizePolicy::none ? f->width : opt_.width;
      rgb_.resize(static_cast<size_t>(out_h_) * out_w_ * 3);
    }
    // Cropping moves the plane pointers of a second reference; the decoder's frame stays as it is.
    auto view = ffmpeg::make_frame();
    if (av_frame_ref(view.get(), f) < 0) in_.fail("out of memory while converting a frame");
    if (opt_.resize == ResizePolicy::shorter_center_crop) {
      const double src_aspect = static_cast<double>(f->width) / f->height;
      const double dst_aspect = static_cast<double>(out_w_) / out_h_;
      if (src_aspect > dst_aspect) {
        const int keep = std::max(1, static_cast<int>(std::lround(f->height * dst_aspect)));
        view->crop_left = static_cast<size_t>((f->width - keep) / 2);
        view->crop_right = static_cast<size_t>(f->width - keep) - view->crop_left;
      } else {
        const int keep = std::max(1, static_cast<int>(std::lround(f->width / dst_aspect)));
        view->crop_top = static_cast<size_t>((f->height - keep) / 2);
        view->crop_bottom = static_cast<size_t>(f->height - keep) - view->crop_top;
      }
      if (av_frame_apply_cropping(view.get(), AV_FRAME_CROP_UNALIGNED) < 0) in_.fail("cannot crop a frame");
    }
    const auto src_fmt = static_cast<AVPixelFormat>(view->format);
    if (src_fmt == AV_PIX_FMT_YUV420P) {
      convert_yuv420p(view.get());
      return;
    }
    sws_.reset(sws_getCachedContext(sws_.release(), view->width, view->height, src_fmt, out_w_, out_h_,
                                    AV_PIX_FMT_RGB24, SWS_BILINEAR, nullptr, nullptr, nullptr));
    if (!sws_) {
      const char* name = av_get_pix_fmt_name(src_fmt);
      in_.fail(std::string("cannot convert pixel format ") + (name ? name : "unknown") + " to RGB");
    }
    uint8_t* dst[4] = {rgb_.data(), nullptr, nullptr, nullptr};
    const int dst_stride[4] = {out_w_ * 3, 0, 0, 0};
    sws_scale(sws_.get(), view->data, view->linesize, 0, view->height, dst, dst_stride);
  }

  // The common 4:2:0 case, faster and closer to a high-quality resampler than one scale-to-RGB call: large frames
  // first shrink by averaging 2×2 blocks while at least a 2× reduction remains for the bilinear filter (one pass
  // over the decoded frame, the memory-bound floor); libswscale then scales to 4:4:4 at the output size, chroma
  // interpolated rather than shared by pixel pairs, and the YUV→RGB step runs on those few pixels. Colour
  // handling is the direct call's: BT.601, limited range.
  void convert_yuv420p(const AVFrame* f) {
    int w = f->width, h = f->height;
    const uint8_t* planes[4] = {f->data[0], f->data[1], f->data[2], nullptr};
    int strides[4] = {f->linesize[0], f->linesize[1], f->linesize[2], 0};
    while (w / 2 >= 2 * out_w_ && h / 2 >= 2 * out_h_) {
      const int nw = w / 2, nh = h / 2;
      for (int p = 0; p < 3; ++p) {
        const int cw = p == 0 ? w : (w + 1) / 2, ch = p == 0 ? h : (h + 1) / 2;
        const int dw = p == 0 ? nw : (nw + 1) / 2, dh = p == 0 ? nh : (nh + 1) / 2;
        std::vector<uint8_t>& dst = halved_[p][planes[p] == halved_[p][0].data() ? 1 : 0];
        dst.resize(static_cast<size_t>(padded(dw)) * dh + kPad);
        halve(planes[p], strides[p], cw, ch, dst.data(), padded(dw), dw, dh);
        planes[p] = dst.data();
        strides[p] = padded(dw);
      }
      w = nw;
      h = nh;
    }
    scale_.reset(sws_getCachedContext(scale_.release(), w, h, AV_PIX_FMT_YUV420P, out_w_, out_h_,
                                      AV_PIX_FMT_YUV444P, SWS_BILINEAR, nullptr, nullptr, nullptr));
    if (!scale_) in_.fail("cannot convert pixel format yuv420p to RGB");
    const int stride = padded(out_w_);
    const size_t plane = static_cast<size_t>(stride) * out_h_;
    yuv_.resize(3 * plane + kPad);
    uint8_t* yuv[4] = {yuv_.data(), yuv_.data() + plane, yuv_.data() + 2 * plane, nullptr};
    const int yuv_strides[4] = {stride, stride, stride, 0};
    sws_scale(scale_.get(), planes, strides, 0, h, yuv, yuv_strides);
    for (int y = 0; y < out_h_; ++y) {
      const size_t row = static_cast<size_t>(y) * stride;
      yuv_to_rgb(yuv[0] + row, yuv[1] + row, yuv[2] + row, rgb_.data() + static_cast<size_t>(y) * out_w_ * 3, out_w_);
    }
  }

  static constexpr size_t kPad = 64;  // bytes after the last row that SIMD loads may touch
  static int padded(int width) { return (width + 31) / 32 * 32; }

  // 2×2 block means (rounded) of a w×h plane into dw×dh; a missing last row or column repeats the edge. Written
  // as two contiguous loops so that the compiler vectorises them.
  void halve(const uint8_t* src, int stride, int w, int h, uint8_t* dst, int dst_stride, int dw, int dh) {
    row_sum_.resize(static_cast<size_t>(2) * dw);
    uint16_t* sum = row_sum_.data();
    for (int y = 0; y < dh; ++y) {
      const uint8_t* r0 = src + static_cast<ptrdiff_t>(std::min(2 * y, h - 1)) * stride;
      const uint8_t* r1 = src + static_cast<ptrdiff_t>(std::min(2 * y + 1, h - 1)) * stride;
      const int n = std::min(2 * dw, w);
      for (int x = 0; x < n; ++x) sum[x] = static_cast<uint16_t>(r0[x] + r1[x]);
      for (int x = n; x < 2 * dw; ++x) sum[x] = sum[n - 1];
      uint8_t* out = dst + static_cast<ptrdiff_t>(y) * dst_stride;
      for (int x = 0; x < dw; ++x) out[x] = static_cast<uint8_t>((sum[2 * x] + sum[2 * x + 1] + 2) >> 2);
    }
  }

  Input& in_;
  const VideoOptions& opt_;
  AVFormatContext* fmt_ = nullptr;
  AVStream* st_ = nullptr;
  int stream_ = -1;
  ffmpeg::CodecContextPtr ctx_;
  ffmpeg::PacketPtr pkt_;
  ffmpeg::FramePtr frame_, last_;
  std::unique_ptr<SwsContext, SwsFree> sws_, scale_;
  std::vector<uint8_t> halved_[3][2], yuv_;  // 2×2-averaged planes (two per plane: in and out of a step)
  std::vector<uint16_t> row_sum_;
  AVRational tb_{1, 1};
  int64_t start_ = 0, duration_ = 0, frame_dur_ = 1;
  bool has_index_ = false;
  int64_t position_ = 0;  // largest decode timestamp given to the decoder since the last seek
  int64_t last_pts_ = AV_NOPTS_VALUE;
  std::vector<int64_t> targets_;
  size_t next_ = 0, checked_ = std::numeric_limits<size_t>::max();
  int64_t decoded_bytes_ = 0;
  int bad_packets_ = 0;
  int out_h_ = 0, out_w_ = 0;
  std::vector<uint8_t> rgb_;
  const FrameCallback* on_frame_ = nullptr;
  FrameQueue* queue_ = nullptr;  // set while decode() runs on its own thread
  VideoInfo info_;
  VideoDecodeStats stats_;
};

VideoFrames collect(Input& in, const VideoOptions& options) {
  options.validate();
  VideoDecoder decoder(in, options);
  VideoFrames out;
  const FrameCallback keep = [&](const FrameView& f) {
    const size_t bytes = static_cast<size_t>(f.height) * f.width * 3;
    if (static_cast<int64_t>(out.pixels.size() + bytes) > options.max_output_bytes) {
      in.fail("sampled frames exceed max_output_bytes (" + std::to_string(options.max_output_bytes) + ")");
    }
    out.height = f.height;
    out.width = f.width;
    out.pixels.insert(out.pixels.end(), f.rgb, f.rgb + bytes);
    out.timestamps_s.push_back(f.timestamp_s);
    ++out.frames;
  };
  out.stats = decoder.run(keep);
  out.info = decoder.info();
  return out;
}

}  // namespace

FrameSampling parse_frame_sampling(std::string_view name) {
  if (name == "all") return FrameSampling::all;
  if (name == "fps") return FrameSampling::fps;
  if (name == "uniform") return FrameSampling::uniform;
  throw ConfigError("frame sampling '" + std::string(name) + "': expected all | fps | uniform");
}

void VideoOptions::validate() const {
  if (sampling == FrameSampling::fps && !(fps > 0.0 && std::isfinite(fps))) {
    throw ConfigError("video options: fps must be positive");
  }
  if (sampling == FrameSampling::uniform && num_frames <= 0) {
    throw ConfigError("video options: num_frames must be positive");
  }
  if (resize != ResizePolicy::none && (height <= 0 || width <= 0 || height > max_side || width > max_side)) {
    throw ConfigError("video options: height and width must be in 1.." + std::to_string(max_side));
  }
  if (threads < 0) throw ConfigError("video options: threads must be >= 0");
  if (!(clip_seconds >= 0.0 && std::isfinite(clip_seconds)) || clips < 1 || clip < 0 || clip >= clips) {
    throw ConfigError("video options: clip_seconds must be >= 0, clips >= 1 and clip in [0, clips)");
  }
  if (max_side <= 0 || max_output_bytes <= 0 || max_decoded_bytes <= 0 || !(timeout_s > 0.0)) {
    throw ConfigError("video options: limits must be positive");
  }
}

VideoFrames decode_video_file(const std::filesystem::path& path, const VideoOptions& options) {
  options.validate();
  Input in(path, options.timeout_s);
  return collect(in, options);
}

VideoFrames decode_video_bytes(std::span<const uint8_t> bytes, const std::string& name, const VideoOptions& options) {
  options.validate();
  if (static_cast<int64_t>(bytes.size()) > options.max_file_bytes) {
    throw DataError(name + ": " + std::to_string(bytes.size()) + " bytes, more than max_file_bytes");
  }
  Input in(bytes, name, options.timeout_s);
  return collect(in, options);
}

VideoDecodeStats for_each_video_frame(const std::filesystem::path& path, const VideoOptions& options,
                                      const FrameCallback& on_frame, VideoInfo* info) {
  options.validate();
  Input in(path, options.timeout_s);
  VideoDecoder decoder(in, options);
  const VideoDecodeStats stats = decoder.run(on_frame);
  if (info) *info = decoder.info();
  return stats;
}

Patches patchify_video(const VideoFrames& video, const std::array<float, 3>& mean, const std::array<float, 3>& std,
                       int patch, int tubelet) {
  const size_t frame = static_cast<size_t>(video.height) * video.width * 3;
  if (video.frames <= 0 || video.pixels.size() != frame * static_cast<size_t>(video.frames)) {
    throw DataError("patchify_video: pixel buffer does not match the frame dimensions");
  }
  std::vector<float> values(video.pixels.size());
  for (int t = 0; t < video.frames; ++t) {
    ImageU8 img{video.height, video.width, 3, {}};
    img.pixels.assign(video.pixels.begin() + static_cast<std::ptrdiff_t>(t * frame),
                      video.pixels.begin() + static_cast<std::ptrdiff_t>((t + 1) * frame));
    const ImageF32 norm = normalize_image(img, mean, std);
    std::copy(norm.pixels.begin(), norm.pixels.end(), values.begin() + static_cast<std::ptrdiff_t>(t * frame));
  }
  return patchify_frames(values.data(), video.frames, video.height, video.width, 3, patch, tubelet);
}

}  // namespace longnet::modalities
