// libFuzzer target: image bytes through decode, resize/crop, normalise and patchify (modalities/image.h).
// Built and run by tools/fuzz.sh. Typed errors (longnet::Error) are the expected outcome for bad input; anything
// else (a crash, a sanitizer report, another exception) is a finding.
#include <cstddef>
#include <cstdint>
#include <span>

#include "core/error.h"
#include "modalities/image.h"
#include "modalities/patchify.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace longnet::modalities;
  const ImageLimits limits{.max_side = 4096, .max_pixels = int64_t{1} << 22, .max_file_bytes = int64_t{1} << 20};
  try {
    const ImageU8 img = decode_image_bytes(std::span<const uint8_t>(data, size), "fuzz input", limits);
    ImageOptions opt;
    opt.limits = limits;
    opt.height = 32;
    opt.width = 32;
    opt.resize = size % 2 ? ResizePolicy::shorter_center_crop : ResizePolicy::exact;
    const Patches p = patchify_image(normalize_image(resize_image(img, opt), opt.mean, opt.std), 8);
    if (p.count != 16) __builtin_trap();
  } catch (const longnet::Error&) {
  }
  return 0;
}
