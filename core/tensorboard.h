// TensorBoard event files for scalar metrics, written without TensorFlow or protobuf: the format is a sequence of
// records (length, masked CRC-32C of the length, an Event protocol buffer, masked CRC-32C of it), and the few Event
// fields scalars need are encoded by hand.
//
//   TensorBoardWriter tb(run_dir / "tensorboard");       // creates events.out.tfevents.<time>.<host>
//   tb.add_scalar("train/loss", 2.31, step);
//   tb.flush();                                          // also on destruction
//
// `tensorboard --logdir runs/` shows them; tests read them back with the tensorboard Python package.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>

namespace longnet {

// CRC-32C (Castagnoli), as TFRecord uses it; exposed for tests.
uint32_t crc32c(std::string_view bytes);

class TensorBoardWriter {
 public:
  // Creates `dir` and a new event file in it (a resumed run adds a file; TensorBoard merges them). Throws IoError.
  explicit TensorBoardWriter(const std::filesystem::path& dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  void add_scalar(std::string_view tag, double value, int64_t step);
  // Marks a restart at `step` (a resumed run): TensorBoard discards events of earlier files at steps >= `step`, the
  // ones the interrupted run wrote after its last checkpoint.
  void add_session_start(int64_t step);
  // Pushes buffered records to the file (IoError when the disk is full or the file went away).
  void flush();

  const std::filesystem::path& path() const { return path_; }

 private:
  void write_record(const std::string& event);

  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
};

}  // namespace longnet
