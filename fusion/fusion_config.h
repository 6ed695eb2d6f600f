// Configuration of the multimodal LongNet model (fusion/multimodal_model.h), set from [fusion] and
// [modalities.text|image|video|audio] in experiment files. Width, heads and the MLP come from [model], the attention
// options (position encoding, backend, ...) from [attention]; these tables add what is per modality and per fusion.
//
//   [fusion]
//   strategy = "concat_seq"          # concat_seq | concat_feature | multiway | late | bottleneck
//   depth = 2                        # cross-modality layers (concat_feature: layers over the pooled tokens)
//   segment_lengths = [256, 512]     # dilated pattern of the cross-modality layers
//   dilation_rates = [1, 2]
//   bottleneck_tokens = 4            # bottleneck: learned fusion tokens
//   pooled_length = 16               # concat_feature: common length every modality is pooled to
//   embed_dim = 128                  # contrastive embeddings (per modality and joint)
//   parallel_stacks = false          # per-modality stacks on separate CUDA streams
//   batch_invariant = false          # one sample at a time: results independent of the batch composition
//
//   [modalities.image]
//   enabled = true
//   depth = 2                        # the modality's own LongNet stack (0: encoder only)
//   segment_lengths = [64, 256]
//   dilation_rates = [1, 4]
//   patch_dim = 768                  # values per patch (text: vocab_size instead)
//   positional = "learned"           # learned | sinusoidal
//   max_positions = 64               # per position axis
//
//   fusion::MultimodalConfig mm = fusion::parse_multimodal(root.section("fusion"), root.section("modalities"));
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "modalities/encoders.h"

namespace longnet::config {
class Section;
}

namespace longnet::fusion {

struct ModalityConfig {
  bool enabled = false;
  int64_t depth = 2;                          // blocks of the modality's stack, >= 0
  std::vector<int64_t> segment_lengths{256};  // its dilated pattern
  std::vector<int64_t> dilation_rates{1};
  int64_t input_dim = 0;                      // text: vocab_size (default 256); others: patch_dim (required if enabled)
  modalities::PositionalKind positional = modalities::PositionalKind::learned;
  int64_t max_positions = 1024;               // per axis

  bool operator==(const ModalityConfig&) const = default;
};

struct FusionConfig {
  std::string strategy = "concat_seq";
  int64_t depth = 2;
  std::vector<int64_t> segment_lengths{256};
  std::vector<int64_t> dilation_rates{1};
  int64_t bottleneck_tokens = 4;
  int64_t pooled_length = 16;
  int64_t embed_dim = 128;
  bool parallel_stacks = false;
  bool batch_invariant = false;

  bool operator==(const FusionConfig&) const = default;
};

struct MultimodalConfig {
  MultimodalConfig();  // every modality at default_modality_config (disabled)

  FusionConfig fusion;
  std::array<ModalityConfig, modalities::kModalityCount> modalities;  // indexed by modalities::Modality

  ModalityConfig& operator[](modalities::Modality m) { return modalities[static_cast<size_t>(m)]; }
  const ModalityConfig& operator[](modalities::Modality m) const { return modalities[static_cast<size_t>(m)]; }
  bool any_enabled() const;
  bool operator==(const MultimodalConfig&) const = default;
};

// The defaults of a modality's table (text: vocab_size 256).
ModalityConfig default_modality_config(modalities::Modality modality);

// Strict parsing: unknown keys, wrong types and bad values are ConfigErrors naming file:line:col and the dotted key.
// `modalities` holds the sub-tables text, image, video, audio (any subset; absent ones are disabled).
MultimodalConfig parse_multimodal(const config::Section& fusion, const config::Section& modalities);

}  // namespace longnet::fusion
