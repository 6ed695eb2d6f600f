// A tiny multimodal model (width 16, two heads, one block per stack) and batches for it: text ids, image patches on a
// 2×3 grid, video patches on a 2×2×2 grid and audio log-mel patches, with padding in some samples.
#pragma once

#include <string>

#include <torch/torch.h>

#include "fusion/multimodal_model.h"

namespace longnet::test {

using fusion::ModalityInput;
using fusion::MultimodalInput;
using modalities::Modality;

inline constexpr int64_t kVocab = 11;
inline constexpr int64_t kTextLength = 6;

inline size_t mi(Modality m) { return static_cast<size_t>(m); }

inline fusion::ModelConfig tiny_model() {
  return fusion::ModelConfig{.width = 16, .depth = 1, .heads = 2, .kv_heads = 2, .mlp = fusion::MlpKind::gelu,
                             .mlp_ratio = 2.0};
}

inline fusion::AttentionConfig tiny_attention() {
  return fusion::AttentionConfig{.dilated = {.segment_lengths = {4}, .dilation_rates = {1},
                                             .backend = attention::Backend::reference},
                                 .position = attention::PositionEncoding::rope};
}

inline fusion::MultimodalConfig tiny_config(const std::string& strategy, bool batch_invariant = false) {
  fusion::MultimodalConfig c;
  c.fusion.strategy = strategy;
  c.fusion.depth = 1;
  c.fusion.segment_lengths = {8, 16};
  c.fusion.dilation_rates = {1, 2};
  c.fusion.bottleneck_tokens = 2;
  c.fusion.pooled_length = 3;
  c.fusion.embed_dim = 8;
  c.fusion.batch_invariant = batch_invariant;
  for (Modality m : modalities::kAllModalities) {
    auto& mc = c[m];
    mc.enabled = true;
    mc.depth = 1;
    mc.segment_lengths = {4, 8};
    mc.dilation_rates = {1, 2};
    mc.max_positions = 8;
  }
  c[Modality::text].input_dim = kVocab;
  c[Modality::image].input_dim = 6;
  c[Modality::video].input_dim = 5;
  c[Modality::audio].input_dim = 4;
  c[Modality::audio].positional = modalities::PositionalKind::sinusoidal;
  c[Modality::video].positional = modalities::PositionalKind::sinusoidal;
  return c;
}

inline fusion::MultimodalModel tiny_model_for(const std::string& strategy, bool batch_invariant = false,
                                              torch::Dtype dtype = torch::kDouble) {
  torch::manual_seed(7);
  fusion::MultimodalModel model(tiny_model(), tiny_attention(), tiny_config(strategy, batch_invariant));
  model->to(dtype);
  model->eval();
  return model;
}

// (t, y, x) of a grid, row-major: (N, 3).
inline at::Tensor grid(int64_t t, int64_t y, int64_t x) {
  std::vector<int64_t> v;
  for (int64_t a = 0; a < t; ++a)
    for (int64_t b = 0; b < y; ++b)
      for (int64_t c = 0; c < x; ++c) v.insert(v.end(), {a, b, c});
  return torch::tensor(v, torch::kLong).view({-1, 3});
}

// A batch of `b` samples with every modality given and present; image padding in sample 1, audio padding in sample 0.
inline MultimodalInput full_batch(int64_t b, int64_t seed, torch::Dtype dtype = torch::kDouble) {
  torch::manual_seed(seed);
  MultimodalInput in;
  auto f = torch::TensorOptions().dtype(dtype);
  at::Tensor text_pad = torch::zeros({b, kTextLength}, torch::kBool);
  in.modalities[mi(Modality::text)] =
      ModalityInput{.data = torch::randint(0, kVocab, {b, kTextLength}, torch::kLong), .positions = {},
                    .padding = text_pad};
  at::Tensor image_pad = torch::zeros({b, 6}, torch::kBool);
  if (b > 1) image_pad[1][5] = true;
  in.modalities[mi(Modality::image)] = ModalityInput{
      .data = torch::randn({b, 6, 6}, f), .positions = grid(1, 2, 3).expand({b, 6, 3}).clone(), .padding = image_pad};
  in.modalities[mi(Modality::video)] = ModalityInput{
      .data = torch::randn({b, 8, 5}, f), .positions = grid(2, 2, 2).expand({b, 8, 3}).clone(), .padding = {}};
  at::Tensor audio_pad = torch::zeros({b, 7}, torch::kBool);
  audio_pad[0].narrow(0, 5, 2).fill_(true);
  at::Tensor audio_pos = torch::zeros({b, 7, 3}, torch::kLong);
  audio_pos.select(2, 0).copy_(torch::arange(7, torch::kLong).expand({b, 7}));
  in.modalities[mi(Modality::audio)] =
      ModalityInput{.data = torch::randn({b, 7, 4}, f), .positions = audio_pos, .padding = audio_pad};
  in.present = torch::ones({b, modalities::kModalityCount}, torch::kBool);
  return in;
}

// Row `b` of a batch as a batch of one.
inline MultimodalInput row(const MultimodalInput& in, int64_t b) {
  MultimodalInput one;
  for (size_t m = 0; m < in.modalities.size(); ++m) {
    if (!in.modalities[m]) continue;
    auto r = [b](const at::Tensor& t) { return t.defined() ? t.narrow(0, b, 1).clone() : t; };
    const auto& x = *in.modalities[m];
    one.modalities[m] = ModalityInput{.data = r(x.data), .positions = r(x.positions), .padding = r(x.padding)};
  }
  one.present = in.present.narrow(0, b, 1).clone();
  return one;
}

// The same input without modality m (not given at all).
inline MultimodalInput without(MultimodalInput in, Modality m) {
  in.modalities[mi(m)].reset();
  in.present = in.present.clone();
  in.present.select(1, static_cast<int64_t>(m)).fill_(false);
  return in;
}

inline const std::vector<std::string>& all_strategies() {
  static const std::vector<std::string> names{"concat_seq", "concat_feature", "multiway", "late", "bottleneck"};
  return names;
}

}  // namespace longnet::test
