// Test media made on the fly: the ffmpeg command line (lavfi sources) writes clips into a TempDir.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace longnet::test {

// Runs a shell command; throws with the command line when it fails.
inline void run_command(const std::string& command) {
  if (std::system((command + " >/dev/null 2>&1").c_str()) != 0) {
    throw std::runtime_error("command failed: " + command);
  }
}

// ffmpeg -f lavfi -i <source> <args> <out>; returns out.
inline std::filesystem::path lavfi(const std::filesystem::path& out, const std::string& source,
                                   const std::string& args) {
  run_command("ffmpeg -nostdin -v error -y -f lavfi -i \"" + source + "\" " + args + " \"" + out.string() + "\"");
  return out;
}

// A 30 fps clip whose frame N has luma floor(16 + 1.8·N) (limited range, N < 122), so that every frame is
// recognisable by its pixel values;
// near-lossless h264 with 3 B-frames between P-frames (x264 drops B-frames when lossless) and a keyframe every
// `gop` frames.
inline std::filesystem::path counter_clip(const std::filesystem::path& out, double seconds, int gop,
                                          const std::string& extra = "") {
  return lavfi(out,
               "color=c=black:size=64x48:rate=30:duration=" + std::to_string(seconds) +
                   ",geq=lum='16+1.8*N':cb=128:cr=128",
               "-c:v libx264 -qp 1 -x264-params b-adapt=0:bframes=3 -g " + std::to_string(gop) + " -keyint_min " + std::to_string(gop) +
                   " -sc_threshold 0 -pix_fmt yuv420p " + extra);
}

inline std::vector<uint8_t> read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void write_bytes(const std::filesystem::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                              static_cast<std::streamsize>(bytes.size()));
}

}  // namespace longnet::test
