// Random draws fixed by a key rather than by a generator's history (splitmix64 folded over the key's parts): the
// same key gives the same draw in any thread, batch order or resumed process, so nothing about it needs saving.
#pragma once

#include <cstdint>
#include <initializer_list>

namespace longnet {

inline uint64_t keyed_hash(std::initializer_list<uint64_t> parts) {
  auto mix = [](uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
  };
  uint64_t h = 0;
  bool first = true;
  for (const uint64_t p : parts) {
    h = first ? mix(p) : mix(h ^ p);
    first = false;
  }
  return h;
}

// Uniform in [0, 1), 53 bits.
inline double keyed_uniform(std::initializer_list<uint64_t> parts) {
  return static_cast<double>(keyed_hash(parts) >> 11) * 0x1.0p-53;
}

}  // namespace longnet
