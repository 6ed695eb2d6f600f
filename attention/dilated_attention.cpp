#include "attention/dilated_attention.h"

#include <numeric>

#include "core/error.h"

namespace longnet::attention {

Backend parse_backend(const std::string& name) {
  if (name == "auto") return Backend::automatic;
  if (name == "reference") return Backend::reference;
  if (name == "flash") return Backend::flash;
  throw ConfigError("unknown attention backend '" + name + "' (expected auto, reference or flash)");
}

std::string to_string(Backend backend) {
  switch (backend) {
    case Backend::automatic: return "auto";
    case Backend::reference: return "reference";
    case Backend::flash: return "flash";
  }
  return "auto";
}

void DilatedAttentionConfig::validate() const {
  if (segment_lengths.empty()) throw ConfigError("dilated attention needs at least one branch (segment_lengths is empty)");
  if (segment_lengths.size() != dilation_rates.size()) {
    throw ConfigError("dilated attention needs one dilation rate per segment length (" +
                      std::to_string(segment_lengths.size()) + " segment lengths, " +
                      std::to_string(dilation_rates.size()) + " dilation rates)");
  }
  for (size_t i = 0; i < segment_lengths.size(); ++i) {
    const int64_t w = segment_lengths[i], r = dilation_rates[i];
    if (w < 1) throw ConfigError("segment_lengths[" + std::to_string(i) + "] must be >= 1, got " + std::to_string(w));
    if (r < 1) throw ConfigError("dilation_rates[" + std::to_string(i) + "] must be >= 1, got " + std::to_string(r));
    if (w % r != 0) {
      throw ConfigError("dilation_rates[" + std::to_string(i) + "] = " + std::to_string(r) +
                        " must divide segment_lengths[" + std::to_string(i) + "] = " + std::to_string(w));
    }
  }
}

std::vector<std::string> DilatedAttentionConfig::coverage_warnings(int64_t heads) const {
  // Row j of a segment is covered for head h by branch i when j ≡ h (mod r_i). Position p's row index differs per
  // branch (p mod w_i), but j mod r_i = p mod r_i because r_i divides w_i; so coverage depends on p mod lcm(r_i) only.
  std::vector<std::string> warnings;
  int64_t period = 1;
  for (int64_t r : dilation_rates) period = std::lcm(period, r);
  for (int64_t h = 0; h < heads; ++h) {
    int64_t uncovered = 0;
    for (int64_t p = 0; p < period; ++p) {
      bool covered = false;
      for (int64_t r : dilation_rates) covered = covered || (p % r == h % r);
      if (!covered) ++uncovered;
    }
    if (uncovered > 0) {
      warnings.push_back("head " + std::to_string(h) + ": " + std::to_string(uncovered) + " of every " +
                         std::to_string(period) + " positions are selected by no branch and output zeros");
    }
  }
  return warnings;
}

double DilatedAttentionConfig::forward_flops(int64_t batch, int64_t n, int64_t heads, int64_t head_dim) const {
  double flops = 0;
  for (size_t i = 0; i < segment_lengths.size(); ++i) {
    const int64_t w = std::min(segment_lengths[i], n), r = dilation_rates[i];
    const int64_t full = n / w, tail = n % w;
    const double rows = static_cast<double>((w + r - 1) / r);
    const double tail_rows = static_cast<double>((tail + r - 1) / r);
    flops += static_cast<double>(full) * rows * rows + tail_rows * tail_rows;
  }
  return flops * 4.0 * static_cast<double>(batch * heads * head_dim);
}

}  // namespace longnet::attention
