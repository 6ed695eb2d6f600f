#include "pipelines/text_corpus.h"

#include <cmath>
#include <fstream>
#include <iterator>

#include <torch/torch.h>

#include "core/error.h"

namespace longnet::pipelines {

TextCorpus::TextCorpus(const std::vector<std::string>& files, double validation_fraction, int64_t window)
    : window_(window) {
  std::vector<uint8_t> all;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in || std::filesystem::is_directory(f)) {
      throw DataError("corpus file '" + f + "' cannot be read" +
                      (std::filesystem::exists(f) ? std::string() : ": no such file"));
    }
    const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (bytes.empty()) throw DataError("corpus file '" + f + "' is empty");
    all.insert(all.end(), bytes.begin(), bytes.end());
  }
  const auto held_out = static_cast<size_t>(std::llround(static_cast<double>(all.size()) * validation_fraction));
  train_.assign(all.begin(), all.end() - static_cast<std::ptrdiff_t>(held_out));
  validation_.assign(all.end() - static_cast<std::ptrdiff_t>(held_out), all.end());
  if (train_bytes() <= window_ || validation_bytes() < window_) {
    throw DataError("corpus of " + std::to_string(all.size()) + " bytes is too small for windows of " +
                    std::to_string(window_) + " tokens (train split " + std::to_string(train_.size()) +
                    " bytes, validation split " + std::to_string(validation_.size()) + " bytes)");
  }
}

at::Tensor TextCorpus::sample_train(int64_t batch, std::mt19937_64& rng) const {
  std::uniform_int_distribution<int64_t> start(0, train_bytes() - window_);
  auto tokens = torch::empty({batch, window_}, torch::kInt64);
  auto acc = tokens.accessor<int64_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t s = start(rng);
    for (int64_t i = 0; i < window_; ++i) acc[b][i] = train_[static_cast<size_t>(s + i)];
  }
  return tokens;
}

at::Tensor TextCorpus::validation_windows(int64_t max_windows) const {
  const int64_t m = std::min(max_windows, validation_bytes() / window_);
  auto tokens = torch::empty({m, window_}, torch::kInt64);
  auto acc = tokens.accessor<int64_t, 2>();
  for (int64_t b = 0; b < m; ++b) {
    for (int64_t i = 0; i < window_; ++i) acc[b][i] = validation_[static_cast<size_t>(b * window_ + i)];
  }
  return tokens;
}

double TextCorpus::unigram_bits_per_byte() const {
  std::vector<double> counts(256, 0.0);
  for (uint8_t b : train_) counts[b] += 1;
  double bits = 0;
  for (double c : counts) {
    if (c > 0) {
      const double p = c / static_cast<double>(train_.size());
      bits -= p * std::log2(p);
    }
  }
  return bits;
}

}  // namespace longnet::pipelines
