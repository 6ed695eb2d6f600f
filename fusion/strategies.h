// Fusion strategies of the multimodal model: how the outputs of the per-modality stacks become one joint
// representation per sample. Chosen by name (`fusion.strategy`) from a registry:
//
//   concat_seq      per sample, the present modalities' tokens concatenated along the sequence, then `depth`
//                   cross-modality dilated-attention blocks with key padding; masked mean pool (the default)
//   concat_feature  every modality pooled (masked adaptive average) to `pooled_length` tokens, concatenated along the
//                   features (absent modalities: zeros), projected to C, then `depth` blocks; mean pool
//   multiway        as concat_seq, but each block has a shared attention and one feed-forward expert per modality
//                   (BEiT-3 / VLMo multiway transformer)
//   late            no cross-modality layer: each modality mean-pooled and projected, combined by learned weights
//                   softmax-normalised over the present modalities
//   bottleneck      `bottleneck_tokens` learned fusion tokens; in each layer every present modality attends over its
//                   tokens plus the bottleneck (its own block), and the bottleneck updates are averaged over the
//                   modalities (Nagrani et al. 2021, "Attention Bottlenecks for Multimodal Fusion")
//
// A modality that a sample lacks contributes nothing to that sample: its rows are never read (strategies work on
// groups of samples with the same present modalities), so their content does not matter.
//
//   auto fusion = fusion::make_strategy({.model = model, .attention = attention, .fusion = cfg, .enabled = enabled});
//   at::Tensor joint = fusion->forward({.tokens = tokens, .padding = padding, .present = present});  // (B, C)
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include "fusion/block.h"
#include "fusion/fusion_config.h"
#include "fusion/model_config.h"
#include "modalities/encoders.h"

namespace longnet::fusion {

using ModalityTensors = std::array<at::Tensor, modalities::kModalityCount>;

struct FusionInput {
  ModalityTensors tokens{};   // (B, N_m, C) per modality; undefined when the batch has none of it
  ModalityTensors padding{};  // (B, N_m) bool, true = padding; undefined: no padding
  at::Tensor present{};       // (B, M) bool, on the host (see presence_groups; the tokens' device is accepted);
                              // every sample has at least one present modality
};

// Everything a strategy is built from.
struct StrategyContext {
  ModelConfig model;          // width, heads, MLP of the cross-modality blocks
  AttentionConfig attention;  // attention options; the dilated pattern is replaced by fusion's, never causal
  FusionConfig fusion;
  std::array<bool, modalities::kModalityCount> enabled{};  // the modalities the model has
};

class FusionStrategyImpl : public torch::nn::Module {
 public:
  // → the joint representation (B, C).
  virtual at::Tensor forward(const FusionInput& input) = 0;
  // Forward matmul + attention FLOPs for one sample whose modalities have these token counts (0: absent).
  virtual double forward_flops(const std::array<int64_t, modalities::kModalityCount>& lengths) const = 0;
};

using StrategyFactory = std::function<std::shared_ptr<FusionStrategyImpl>(const StrategyContext&)>;

// Registers (or replaces) a strategy under `name`. Not thread-safe: register at start-up.
void register_strategy(const std::string& name, StrategyFactory factory);
// Names of the registered strategies, the built-in ones first.
std::vector<std::string> registered_strategies();
// Throws ConfigError for an unknown name or an invalid context (no enabled modality, bad sizes).
std::shared_ptr<FusionStrategyImpl> make_strategy(const StrategyContext& context);

// ---- shared pieces -------------------------------------------------------------------------------------------------

// Mean over the non-padding tokens: x (B, N, C), padding (B, N) bool or undefined → (B, C); zeros where a row has no
// token.
at::Tensor masked_mean(const at::Tensor& x, const at::Tensor& padding);

// Presence bookkeeping runs on the host: the flags (B, M) and the row indices derived from them are tiny, and
// reading them on a GPU (item, nonzero, a blocking copy) would make the host wait for all queued work. A `present` on
// the device is accepted, at the cost of that one wait when it is copied to the host. Indices and masks reach the
// device through longnet::to_device_async (core/device_copy.h).

// Samples grouped by their set of present modalities: (bit mask over Modality, row indices (G,) int64 on `device`),
// in increasing mask order.
std::vector<std::pair<uint32_t, at::Tensor>> presence_groups(const at::Tensor& present, at::Device device);

// Rows of a batch by sample index, for `rows` as presence_groups (or nonzero) gives them: ascending and distinct, so
// that as many rows as t has are all of them, in order. Then t itself is taken, or `values` put, with no copy.
at::Tensor take_rows(const at::Tensor& t, const at::Tensor& rows);                        // t.index_select(0, rows)
at::Tensor put_rows(const at::Tensor& t, const at::Tensor& rows, const at::Tensor& values);  // t.index_copy(0, ...)

// Forward FLOPs of one sample of n tokens through `block` (a transformer block or a part of one): 2·n·(its matrix
// parameters) plus, when `dilated` is given, the attention's score and value products.
double block_forward_flops(const torch::nn::Module& block, const ModelConfig& model,
                           const attention::DilatedAttentionConfig* dilated, int64_t n);

}  // namespace longnet::fusion
