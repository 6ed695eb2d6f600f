#include "fusion/fusion_config.h"

#include <string>

#include "core/config_reader.h"
#include "core/error.h"
#include "fusion/strategies.h"

namespace longnet::fusion {
namespace {

using config::Section;
using modalities::Modality;

using config::at_least;

ModalityConfig parse_modality(const Section& s, Modality m) {
  ModalityConfig c = default_modality_config(m);
  c.enabled = s.boolean("enabled", c.enabled);
  c.depth = s.integer("depth", c.depth);
  at_least(s, "depth", c.depth, 0);
  config::read_dilated_pattern(s, c.segment_lengths, c.dilation_rates);
  if (m == Modality::text) {
    c.input_dim = s.integer("vocab_size", c.input_dim);
    at_least(s, "vocab_size", c.input_dim, 2);
  } else {
    if (c.enabled && !s.has("patch_dim")) s.fail("patch_dim", "is required for an enabled modality (values per patch)");
    c.input_dim = s.integer("patch_dim", c.input_dim);
    if (c.enabled || s.has("patch_dim")) at_least(s, "patch_dim", c.input_dim, 1);
  }
  c.positional = modalities::parse_positional_kind(
      s.choice("positional", modalities::to_string(c.positional), {"learned", "sinusoidal"}));
  c.max_positions = s.integer("max_positions", c.max_positions);
  at_least(s, "max_positions", c.max_positions, 1);
  s.finish();
  return c;
}

}  // namespace

MultimodalConfig::MultimodalConfig() {
  for (Modality m : modalities::kAllModalities) (*this)[m] = default_modality_config(m);
}

bool MultimodalConfig::any_enabled() const {
  for (const auto& m : modalities) {
    if (m.enabled) return true;
  }
  return false;
}

ModalityConfig default_modality_config(Modality modality) {
  ModalityConfig c;
  c.input_dim = modality == Modality::text ? 256 : 0;
  return c;
}

MultimodalConfig parse_multimodal(const config::Section& fusion, const config::Section& modalities) {
  MultimodalConfig c;
  auto& f = c.fusion;
  f.strategy = fusion.choice("strategy", f.strategy, registered_strategies());
  f.depth = fusion.integer("depth", f.depth);
  // Strategies built on cross-modality layers need at least one; concat_feature and late may have none.
  const bool needs_layers = f.strategy == "concat_seq" || f.strategy == "multiway" || f.strategy == "bottleneck";
  at_least(fusion, "depth", f.depth, needs_layers ? 1 : 0);
  config::read_dilated_pattern(fusion, f.segment_lengths, f.dilation_rates);
  f.bottleneck_tokens = fusion.integer("bottleneck_tokens", f.bottleneck_tokens);
  at_least(fusion, "bottleneck_tokens", f.bottleneck_tokens, 1);
  f.pooled_length = fusion.integer("pooled_length", f.pooled_length);
  at_least(fusion, "pooled_length", f.pooled_length, 1);
  f.embed_dim = fusion.integer("embed_dim", f.embed_dim);
  at_least(fusion, "embed_dim", f.embed_dim, 1);
  f.parallel_stacks = fusion.boolean("parallel_stacks", f.parallel_stacks);
  f.batch_invariant = fusion.boolean("batch_invariant", f.batch_invariant);
  fusion.finish();

  for (Modality m : modalities::kAllModalities) {
    c[m] = parse_modality(modalities.section(modalities::to_string(m)), m);
  }
  modalities.finish();
  return c;
}

}  // namespace longnet::fusion
