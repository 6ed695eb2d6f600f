// Modality encoders: the first layer of every modality's LongNet stack. Each turns one modality's decoded input into
// tokens of the model width C, then adds a learned modality embedding (one vector per modality, so that fused
// sequences know where each token came from) and a positional encoding, learned or sinusoidal:
//
//   modality  input                                   embedding                         positions
//   text      ids (B, L) int64                        token table (vocab, C)            1-D: 0..L-1
//   image     patches (B, N, dim) + (B, N, 3) int64   linear dim → C                     2-D: (y, x)
//   video     patches (B, N, dim) + (B, N, 3) int64   linear dim → C                     3-D: (t, y, x)
//   audio     log-mel patches (B, N, dim) + (B, N, 3) LayerNorm over the patch, linear  1-D: t
//
// Positions arrive as (t, y, x) triples from the decoders (images use t = 0, audio (t, 0, 0)). Learned positions are
// one table (max_positions, C) per axis, summed; sinusoidal ones split the C channels among the axes (the first axis
// takes the remainder) and encode each axis with interleaved sin/cos at geometric frequencies (Vaswani et al.), so
// an image token's channels say its row and its column separately.
//
//   modalities::ModalityEncoder enc({.modality = Modality::image, .width = 128, .input_dim = 768,
//                                    .positional = PositionalKind::sinusoidal, .max_positions = 64});
//   at::Tensor tokens = enc(values, positions);   // (B, N, 768), (B, N, 3) → (B, N, 128)
//   at::Tensor text = text_enc(ids);              // (B, L) → (B, L, 128)
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "core/linear.h"

namespace longnet::modalities {

// The modalities of a multimodal model, in the fixed order of presence flags (B, kModalityCount) and of fused
// sequences.
enum class Modality { text = 0, image = 1, video = 2, audio = 3 };
inline constexpr int64_t kModalityCount = 4;
inline constexpr std::array<Modality, kModalityCount> kAllModalities{Modality::text, Modality::image, Modality::video,
                                                                     Modality::audio};

// "text" | "image" | "video" | "audio"
std::string to_string(Modality modality);
std::optional<Modality> parse_modality(std::string_view name);
// Position axes read from the (t, y, x) triples: text and audio 1, image 2, video 3.
int64_t position_axes(Modality modality);

enum class PositionalKind { learned, sinusoidal };
// "learned" | "sinusoidal"; anything else is a ConfigError listing both.
PositionalKind parse_positional_kind(const std::string& name);
std::string to_string(PositionalKind kind);

// Interleaved sinusoids of `positions` (any shape, integer or float): (..., dim) float64 with channel 2i =
// sin(p · base^(-2i/dim)) and channel 2i + 1 = cos(p · base^(-2i/dim)).
at::Tensor sinusoidal_encoding(const at::Tensor& positions, int64_t dim, double base = 10000.0);

struct EncoderOptions {
  Modality modality = Modality::text;
  int64_t width = 256;       // C
  int64_t input_dim = 256;   // text: vocabulary size; others: values per patch
  PositionalKind positional = PositionalKind::learned;
  int64_t max_positions = 1024;  // per axis: positions must lie in [0, max_positions) (learned tables have this many
                                 // rows; sinusoidal encodings accept the same range, so switching kinds is safe)

  // Throws ConfigError for non-positive sizes.
  void validate() const;
};

class ModalityEncoderImpl : public torch::nn::Module {
 public:
  explicit ModalityEncoderImpl(const EncoderOptions& options);

  // text: input (B, L) int64 ids in [0, vocab), positions ignored (0..L-1);
  // others: input (B, N, dim) float, positions (B, N, 3) int64 (t, y, x) → (B, N, C) in the module's dtype.
  // Throws DataError for wrong shapes or dtypes, and on the CPU for values check_ranges rejects.
  at::Tensor forward(const at::Tensor& input, const at::Tensor& positions = {});

  // Throws DataError for ids outside the vocabulary or used positions outside [0, max_positions). forward runs it on
  // CPU inputs only: on a GPU reading the extremes back would make the host wait for the device, so callers check
  // the host batch before moving it (the multimodal pipeline does, through MultimodalModel::check_ranges). There
  // an id or a learned position out of range still stops its table lookup with a device-side assertion.
  void check_ranges(const at::Tensor& input, const at::Tensor& positions = {}) const;

  const EncoderOptions& options() const { return options_; }
  // The token (or patch) embedding matrix: (vocab, C) for text (an LM head may share it), (C, dim) otherwise.
  const at::Tensor& embedding_weight() const;
  int64_t num_parameters() const;
  // Forward matmul FLOPs for one sample of n tokens (2·n·dim·C for patches; text lookups cost none).
  double forward_flops(int64_t n) const;

 private:
  at::Tensor positional(const at::Tensor& axis_positions, at::ScalarType dtype);  // (B, N, axes) → (B, N, C)
  at::Tensor used_positions(const at::Tensor& positions) const;  // the axes this modality encodes: (B, N, axes)
  // (h + modality embedding) + learned positions in one CUDA kernel (modalities/kernels/position_sum.h), the same
  // float32 result as the torch ops; undefined where it does not apply (CPU, sinusoidal positions, tables that are not
  // float32, a width that is not a multiple of 4).
  at::Tensor fused_learned_sum(const at::Tensor& h, const at::Tensor& axis_positions);

  EncoderOptions options_;
  torch::nn::Embedding tokens_{nullptr};     // text
  longnet::Linear patches_{nullptr};       // image, video, audio
  torch::nn::LayerNorm patch_norm_{nullptr}; // audio: log-mel levels vary by recording; no affine
  at::Tensor modality_embedding_;            // (C)
  std::vector<torch::nn::Embedding> position_tables_;  // learned: one (max_positions, C) per axis
};

TORCH_MODULE(ModalityEncoder);

}  // namespace longnet::modalities
