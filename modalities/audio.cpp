#include "modalities/audio.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "modalities/ffmpeg_input.h"

extern "C" {
#include <libavutil/channel_layout.h>
#include <libavutil/opt.h>
#include <libswresample/swresample.h>
}

namespace longnet::modalities {
namespace {

using ffmpeg::Input;

struct SwrFree {
  void operator()(SwrContext* s) const { swr_free(&s); }
};

class AudioDecoder {
 public:
  AudioDecoder(Input& in, const AudioOptions& opt) : in_(in), opt_(opt) {
    stream_ = in.find_stream(AVMEDIA_TYPE_AUDIO);
    ctx_ = in.open_decoder(stream_, 1, 0);
    max_samples_ = static_cast<int64_t>(opt.max_duration_s * opt.sample_rate);
    out_.sample_rate = opt.sample_rate;
    out_.codec = avcodec_get_name(ctx_->codec_id);
  }

  AudioF32 run() {
    auto pkt = ffmpeg::make_packet();
    frame_ = ffmpeg::make_frame();
    AVFormatContext* fmt = in_.format();
    while (true) {
      if (in_.expired()) in_.fail("decoding took longer than the timeout");
      const int ret = av_read_frame(fmt, pkt.get());
      if (ret < 0) {
        if (ret == AVERROR_EXIT) in_.fail("reading packets", ret);
        break;  // end of file, or damaged data at the end: keep what was decoded
      }
      if (pkt->stream_index == stream_) send(pkt.get());
      av_packet_unref(pkt.get());
    }
    send(nullptr);
    if (swr_) convert(nullptr, 0);  // the resampler's delayed samples
    if (decoded_frames_ == 0) in_.fail("no decodable audio frames");
    return std::move(out_);
  }

 private:
  void send(const AVPacket* pkt) {
    int ret = avcodec_send_packet(ctx_.get(), pkt);
    if (ret < 0 && ret != AVERROR_EOF) {
      if (ret == AVERROR(ENOMEM)) in_.fail("out of memory while decoding", ret);
      if (++bad_packets_ > 1000) in_.fail("too many undecodable packets", ret);
      return;
    }
    while (true) {
      ret = avcodec_receive_frame(ctx_.get(), frame_.get());
      if (ret == AVERROR(EAGAIN) || ret == AVERROR_EOF) break;
      if (ret < 0) {
        if (++bad_packets_ > 1000) in_.fail("too many undecodable frames", ret);
        break;
      }
      ++decoded_frames_;
      setup(frame_.get());
      convert(const_cast<const uint8_t**>(frame_->extended_data), frame_->nb_samples);
      av_frame_unref(frame_.get());
    }
  }

  // (Re)creates the resampler for the frame's format; streams may change rate or layout midway.
  void setup(const AVFrame* f) {
    if (f->sample_rate <= 0 || f->sample_rate > 1'000'000 || f->ch_layout.nb_channels <= 0 ||
        f->ch_layout.nb_channels > 64) {
      in_.fail("audio frame has an invalid format (" + std::to_string(f->sample_rate) + " Hz, " +
               std::to_string(f->ch_layout.nb_channels) + " channels)");
    }
    if (swr_ && f->sample_rate == in_rate_ && f->format == in_format_ &&
        av_channel_layout_compare(&f->ch_layout, &seen_layout_) == 0) {
      return;
    }
    if (swr_) convert(nullptr, 0);
    av_channel_layout_uninit(&seen_layout_);
    av_channel_layout_uninit(&in_layout_);
    if (av_channel_layout_copy(&seen_layout_, &f->ch_layout) < 0) in_.fail("out of memory while copying a layout");
    // An unspecified layout (e.g. wav without a channel mask) gets the default one for its channel count.
    if (f->ch_layout.order == AV_CHANNEL_ORDER_UNSPEC) {
      av_channel_layout_default(&in_layout_, f->ch_layout.nb_channels);
    } else if (av_channel_layout_copy(&in_layout_, &f->ch_layout) < 0) {
      in_.fail("out of memory while copying a channel layout");
    }
    in_rate_ = f->sample_rate;
    in_format_ = f->format;
    out_.source_sample_rate = f->sample_rate;
    out_.source_channels = f->ch_layout.nb_channels;
    AVChannelLayout mono = AV_CHANNEL_LAYOUT_MONO;
    SwrContext* s = nullptr;
    int ret = swr_alloc_set_opts2(&s, &mono, AV_SAMPLE_FMT_FLT, opt_.sample_rate, &in_layout_,
                                  static_cast<AVSampleFormat>(f->format), f->sample_rate, 0, nullptr);
    swr_.reset(s);
    if (ret >= 0) ret = swr_init(s);
    if (ret < 0) in_.fail("cannot set up resampling to " + std::to_string(opt_.sample_rate) + " Hz mono", ret);
  }

  void convert(const uint8_t** data, int samples) {
    const int64_t room = swr_get_out_samples(swr_.get(), samples);
    if (room < 0) in_.fail("resampler failed", static_cast<int>(room));
    const size_t have = out_.samples.size();
    if (room > max_samples_ + opt_.sample_rate) {  // one absurd frame must not allocate before the check below
      in_.fail("audio is longer than max_duration_s (" + std::to_string(opt_.max_duration_s) + " s)");
    }
    out_.samples.resize(have + static_cast<size_t>(room));
    uint8_t* dst[1] = {reinterpret_cast<uint8_t*>(out_.samples.data() + have)};
    const int n = swr_convert(swr_.get(), dst, static_cast<int>(room), data, samples);
    if (n < 0) in_.fail("resampler failed", n);
    out_.samples.resize(have + static_cast<size_t>(n));
    if (static_cast<int64_t>(out_.samples.size()) > max_samples_) {
      in_.fail("audio is longer than max_duration_s (" + std::to_string(opt_.max_duration_s) + " s)");
    }
  }

  Input& in_;
  const AudioOptions& opt_;
  int stream_ = -1;
  ffmpeg::CodecContextPtr ctx_;
  ffmpeg::FramePtr frame_;
  std::unique_ptr<SwrContext, SwrFree> swr_;
  AVChannelLayout seen_layout_{};  // as the frames carry it
  AVChannelLayout in_layout_{};    // as given to the resampler
  int in_rate_ = 0, in_format_ = -1;
  int64_t max_samples_ = 0, decoded_frames_ = 0;
  int bad_packets_ = 0;
  AudioF32 out_;

 public:
  ~AudioDecoder() {
    av_channel_layout_uninit(&seen_layout_);
    av_channel_layout_uninit(&in_layout_);
  }
  AudioDecoder(const AudioDecoder&) = delete;
  AudioDecoder& operator=(const AudioDecoder&) = delete;
};

}  // namespace

void AudioOptions::validate() const {
  if (sample_rate < 1000 || sample_rate > 384000) {
    throw ConfigError("audio options: sample_rate must be in 1000..384000 (got " + std::to_string(sample_rate) + ")");
  }
  if (!(max_duration_s > 0.0) || !(timeout_s > 0.0) || max_file_bytes <= 0) {
    throw ConfigError("audio options: limits must be positive");
  }
}

AudioF32 decode_audio_file(const std::filesystem::path& path, const AudioOptions& options) {
  options.validate();
  Input in(path, options.timeout_s);
  return AudioDecoder(in, options).run();
}

AudioF32 decode_audio_bytes(std::span<const uint8_t> bytes, const std::string& name, const AudioOptions& options) {
  options.validate();
  if (static_cast<int64_t>(bytes.size()) > options.max_file_bytes) {
    throw DataError(name + ": " + std::to_string(bytes.size()) + " bytes, more than max_file_bytes");
  }
  Input in(bytes, name, options.timeout_s);
  return AudioDecoder(in, options).run();
}

}  // namespace longnet::modalities
