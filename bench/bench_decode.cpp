// bench_decode: video decode + sample + convert throughput of modalities/video.h against `ffmpeg -threads N -i X
// -f null -` on the same generated clips, in the same run.
//
// Modes (ours converts every returned frame to 224×224 RGB with libswscale; ffmpeg converts nothing):
//   all        every frame                                target: ≤ 1.3× ffmpeg's time
//   1fps_seek  1 frame per second, seeking + skipping     target: faster than ffmpeg decoding everything
//   1fps_noseek 1 frame per second, decoding every packet (shows what seeking buys)
// Clips: testsrc2 h264 (x264 veryfast, yuv420p, 30 fps, a keyframe every 2 s), generated once with ffmpeg into
// --media-dir. Each time is the best of --repeats runs; ffmpeg and ours run back to back in each repetition, and the
// median of those per-repetition ratios is reported next to the ratio of the best times (load on a shared machine
// that drifts between repetitions cancels in a pair), and so is the median ratio of CPU times (user + system, every
// thread), which time given to other tenants does not inflate.
//
// Usage:
//   bench_decode --seconds 60 --sizes 1920x1080,640x360 --threads 1,2 --out bench/results
// Writes <out>/cpu_decode.json and <out>/decode.md and prints the table.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "modalities/video.h"

extern "C" {
#include <libavcodec/version.h>
}

namespace {

namespace fs = std::filesystem;
using longnet::modalities::FrameSampling;
using longnet::modalities::FrameView;
using longnet::modalities::VideoDecodeStats;
using longnet::modalities::VideoOptions;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, sep);) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

void run_or_throw(const std::string& command) {
  if (std::system(command.c_str()) != 0) throw longnet::IoError("command failed: " + command);
}

fs::path make_clip(const fs::path& dir, const std::string& size, int seconds) {
  fs::create_directories(dir);
  const fs::path out = dir / ("testsrc2_" + size + "_" + std::to_string(seconds) + "s.mp4");
  if (fs::exists(out)) return out;
  std::printf("generating %s ...\n", out.c_str());
  std::fflush(stdout);
  const fs::path tmp = out.string() + ".tmp.mp4";
  run_or_throw("ffmpeg -nostdin -v error -y -f lavfi -i testsrc2=size=" + size + ":rate=30:duration=" +
               std::to_string(seconds) + " -c:v libx264 -preset veryfast -g 60 -pix_fmt yuv420p \"" + tmp.string() +
               "\"");
  fs::rename(tmp, out);
  return out;
}

// User + system CPU seconds of this process (RUSAGE_SELF, every thread) or of its finished children.
double cpu_seconds(int who) {
  rusage u{};
  getrusage(who, &u);
  auto s = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_usec); };
  return s(u.ru_utime) + s(u.ru_stime);
}

struct Timing {
  double seconds = 0.0, cpu_seconds = 0.0;
};

Timing time_ffmpeg(const fs::path& clip, int threads) {
  const double t0 = now_s(), c0 = cpu_seconds(RUSAGE_CHILDREN);
  run_or_throw("ffmpeg -nostdin -v error -threads " + std::to_string(threads) + " -i \"" + clip.string() +
               "\" -f null -");
  return {now_s() - t0, cpu_seconds(RUSAGE_CHILDREN) - c0};
}

struct Ours {
  double seconds = 0.0, cpu_seconds = 0.0;
  VideoDecodeStats stats;
  uint64_t checksum = 0;  // of the returned pixels, so that the conversion cannot be skipped
};

Ours time_ours(const fs::path& clip, int threads, FrameSampling sampling, bool seek) {
  VideoOptions opt;
  opt.sampling = sampling;
  opt.fps = 1.0;
  opt.height = 224;
  opt.width = 224;
  opt.threads = threads;
  opt.seek = seek;
  opt.skip_nonref = seek;
  Ours r;
  const double t0 = now_s(), c0 = cpu_seconds(RUSAGE_SELF);
  r.stats = longnet::modalities::for_each_video_frame(clip, opt, [&](const FrameView& f) {
    r.checksum += f.rgb[(f.height / 2 * f.width + f.width / 2) * 3];
  });
  r.seconds = now_s() - t0;
  r.cpu_seconds = cpu_seconds(RUSAGE_SELF) - c0;
  return r;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

double median(std::vector<double>& v) {
  std::sort(v.begin(), v.end());
  const size_t mid = v.size() / 2;
  return v.size() % 2 == 1 ? v[mid] : 0.5 * (v[mid - 1] + v[mid]);
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Video decode + sample + convert throughput against ffmpeg"};
  int seconds = 60;
  std::string sizes = "1920x1080,640x360";
  std::string threads_list = "1,2";
  int repeats = 2;
  std::string out_dir = "bench/results";
  std::string media_dir = (fs::temp_directory_path() / "longnet_bench_decode").string();
  app.add_option("--seconds", seconds, "clip length");
  app.add_option("--sizes", sizes, "comma-separated WxH");
  app.add_option("--threads", threads_list, "comma-separated decoder thread counts");
  app.add_option("--repeats", repeats, "runs per measurement; the best counts");
  app.add_option("--out", out_dir, "folder for cpu_decode.json and decode.md");
  app.add_option("--media-dir", media_dir, "where the generated clips are kept");
  CLI11_PARSE(app, argc, argv);

  try {
    nlohmann::json rows = nlohmann::json::array();
    std::string md =
        "| clip | threads | ffmpeg -f null (s) | all frames (s) | all / ffmpeg | all / ffmpeg, paired median |"
        " CPU time all / ffmpeg, paired median | 1 fps seek (s) | ffmpeg / 1 fps seek | 1 fps no seek (s) |"
        " frames decoded (seek / all) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n";
    std::printf("%-22s %3s %10s %10s %8s %8s %8s %10s %8s %10s %14s\n", "clip", "thr", "ffmpeg_s", "all_s", "all/ff",
                "paired", "cpu", "1fps_s", "ff/1fps", "noseek_s", "decoded");
    for (const std::string& size : split(sizes, ',')) {
      const fs::path clip = make_clip(media_dir, size, seconds);
      for (const std::string& t : split(threads_list, ',')) {
        const int threads = std::stoi(t);
        double ff = 1e30;
        std::vector<double> pair_ratios;  // all / ffmpeg within each repetition
        std::vector<double> cpu_ratios;   // the same for CPU time, which time given to other tenants does not inflate
        Ours all, seek, noseek;
        all.seconds = seek.seconds = noseek.seconds = 1e30;
        for (int r = 0; r < std::max(1, repeats); ++r) {
          // Interleaved so that background load hits every mode alike.
          const Timing ff_r = time_ffmpeg(clip, threads);
          ff = std::min(ff, ff_r.seconds);
          Ours o_all = time_ours(clip, threads, FrameSampling::all, false);
          pair_ratios.push_back(o_all.seconds / ff_r.seconds);
          cpu_ratios.push_back(o_all.cpu_seconds / ff_r.cpu_seconds);
          if (o_all.seconds < all.seconds) all = o_all;
          if (Ours o = time_ours(clip, threads, FrameSampling::fps, true); o.seconds < seek.seconds) seek = o;
          if (Ours o = time_ours(clip, threads, FrameSampling::fps, false); o.seconds < noseek.seconds) noseek = o;
        }
        const double pair_median = median(pair_ratios), cpu_median = median(cpu_ratios);
        const std::string name = clip.filename().string();
        std::printf("%-22s %3d %10.2f %10.2f %8.2f %8.2f %8.2f %10.2f %8.2f %10.2f %6lld / %5lld\n", size.c_str(),
                    threads, ff, all.seconds, all.seconds / ff, pair_median, cpu_median, seek.seconds,
                    ff / seek.seconds, noseek.seconds,
                    static_cast<long long>(seek.stats.frames_decoded),
                    static_cast<long long>(all.stats.frames_decoded));
        std::fflush(stdout);
        md += "| " + size + " h264 " + std::to_string(seconds) + " s | " + t + " | " + fmt("%.2f", ff) + " | " +
              fmt("%.2f", all.seconds) + " | " + fmt("%.2f", all.seconds / ff) + " | " + fmt("%.2f", pair_median) +
              " | " + fmt("%.2f", cpu_median) + " | " + fmt("%.2f", seek.seconds) +
              " | " + fmt("%.1f×", ff / seek.seconds) + " | " + fmt("%.2f", noseek.seconds) + " | " +
              std::to_string(seek.stats.frames_decoded) + " / " + std::to_string(all.stats.frames_decoded) + " |\n";
        rows.push_back({{"clip", name},
                        {"size", size},
                        {"seconds", seconds},
                        {"threads", threads},
                        {"ffmpeg_null_s", ff},
                        {"all_s", all.seconds},
                        {"all_over_ffmpeg", all.seconds / ff},
                        {"all_over_ffmpeg_paired_median", pair_median},
                        {"all_over_ffmpeg_paired", pair_ratios},
                        {"all_over_ffmpeg_cpu_paired_median", cpu_median},
                        {"all_over_ffmpeg_cpu_paired", cpu_ratios},
                        {"all_frames", all.stats.frames_returned},
                        {"fps1_seek_s", seek.seconds},
                        {"ffmpeg_over_fps1_seek", ff / seek.seconds},
                        {"fps1_seek_frames", seek.stats.frames_returned},
                        {"fps1_seek_decoded", seek.stats.frames_decoded},
                        {"fps1_seek_seeks", seek.stats.seeks},
                        {"fps1_noseek_s", noseek.seconds},
                        {"fps1_noseek_decoded", noseek.stats.frames_decoded},
                        {"target_all_le_1_3x", all.seconds <= 1.3 * ff},
                        {"target_fps1_faster", seek.seconds < ff}});
      }
    }
    const nlohmann::json doc{
        {"benchmark", "bench_decode"},
        {"machine", {{"cpu", cpu_model()}, {"hardware_threads", std::thread::hardware_concurrency()}}},
        {"libavcodec", LIBAVCODEC_IDENT},
        {"output", "224x224 RGB24 (libswscale bilinear) for every returned frame"},
        {"clips", "testsrc2, libx264 veryfast, yuv420p, 30 fps, keyframe every 60 frames"},
        {"repeats", repeats},
        {"results", rows}};
    fs::create_directories(out_dir);
    longnet::write_file_atomic(fs::path(out_dir) / "cpu_decode.json", doc.dump(2) + "\n");
    md = "# Video decode throughput (CPU)\n\n" + cpu_model() + ", " +
         std::to_string(std::thread::hardware_concurrency()) + " hardware threads; " + LIBAVCODEC_IDENT +
         "; best of " + std::to_string(repeats) + " runs, each running ffmpeg and ours back to back (\"paired median\": "
         "the median over runs of ours / ffmpeg within a run; the CPU-time ratio is not inflated by time the shared "
         "machine gives to other tenants, and with one thread it is what the time ratio would be on an idle machine). "
         "Ours converts every returned frame to 224×224 RGB; "
         "`ffmpeg -threads N -i X -f null -` only decodes. Written by bench_decode.\n\n" + md;
    longnet::write_file_atomic(fs::path(out_dir) / "decode.md", md);
    std::printf("wrote %s/cpu_decode.json and %s/decode.md\n", out_dir.c_str(), out_dir.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_decode: %s\n", longnet::format_error_chain(e).c_str());
    return 1;
  }
}
