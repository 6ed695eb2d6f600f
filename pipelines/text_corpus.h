// A byte-level text corpus for causal language modelling: files read as raw bytes (vocabulary 256), concatenated in
// the given order, with the last `validation_fraction` held out. Training windows are drawn at seeded random
// offsets; validation windows tile the held-out tail deterministically, so evaluations compare across runs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace longnet::pipelines {

class TextCorpus {
 public:
  // Throws DataError naming the file when one is missing, unreadable or empty, or when a split is shorter than
  // one window of `window` bytes.
  TextCorpus(const std::vector<std::string>& files, double validation_fraction, int64_t window);

  int64_t train_bytes() const { return static_cast<int64_t>(train_.size()); }
  int64_t validation_bytes() const { return static_cast<int64_t>(validation_.size()); }

  // tokens: (B, window) int64 — the model input is [:, :-1] and the target [:, 1:].
  at::Tensor sample_train(int64_t batch, std::mt19937_64& rng) const;
  // Up to `max_windows` non-overlapping windows from the start of the held-out tail: (M, window) int64.
  at::Tensor validation_windows(int64_t max_windows) const;
  // Entropy in bits/byte of the training bytes' unigram distribution: what a model that ignores context reaches.
  double unigram_bits_per_byte() const;

 private:
  std::vector<uint8_t> train_;
  std::vector<uint8_t> validation_;
  int64_t window_;
};

}  // namespace longnet::pipelines
