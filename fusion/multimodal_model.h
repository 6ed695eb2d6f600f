// The multimodal LongNet model:
//
//   per modality m present in a batch:  encoder_m (modalities/encoders.h) → stack_m: depth_m pre-norm dilated-attention
//       blocks with the modality's own segment lengths and dilation rates (causal for text) → LayerNorm
//   fusion strategy (fusion/strategies.h) over the stacks' outputs → joint representation (B, C)
//   heads: per-modality embeddings (masked mean of the stack output → linear C → E → L2 norm), a joint embedding
//          (linear C → E → L2 norm of the fusion output) and a text LM head (the text stack's output times the
//          token table, shared with the text encoder). The LM head reads the causal text stack, before any fusion,
//          so that no token sees the ones it predicts.
//
// Missing modalities: presence flags (B, M) say which samples have which modality. A stack runs only on the samples
// that have its modality (index_select the present rows, run, scatter back into zeros), fusion strategies never read
// absent rows, and every output row of an absent modality is zero. So a sample's outputs do not depend on the content
// of its missing modalities.
//
// Bit-exactness across batch composition: a float GEMM's result for one row depends on how many rows the call has
// (MKL blocks the M dimension differently; measured in float64 on CPU: linear on (3, 37, 16) differs in the last bits
// from the same rows one at a time). With fusion.batch_invariant the model therefore runs one sample at a time, so
// every sample's result is identical whatever batch it comes in; without it, samples are batched (per presence group in
// the fusion) and agree with single-sample runs to rounding.
//
// Parallel stacks: with fusion.parallel_stacks on a CUDA device, the stacks of the modalities run on separate streams
// of the pool (each waits for the inputs on the current stream; the current stream waits for each), which pays when
// single stacks leave the GPU partly idle (short sequences, small batches).
//
//   fusion::MultimodalModel model(exp.model, exp.attention, exp.multimodal);
//   fusion::MultimodalInput in;
//   in.modalities[0] = fusion::ModalityInput{.data = ids};                                      // text (B, L)
//   in.modalities[1] = fusion::ModalityInput{.data = patches, .positions = pos, .padding = pad}; // image
//   in.present = present;                                                         // (B, 4) bool, on the host
//   fusion::MultimodalOutput out = model(in);
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "core/linear.h"
#include "fusion/block.h"
#include "fusion/fusion_config.h"
#include "fusion/model_config.h"
#include "fusion/strategies.h"
#include "modalities/encoders.h"

namespace longnet::fusion {

struct ModalityInput {
  at::Tensor data{};       // text: (B, L) int64 ids; image, video, audio: (B, N, dim) float patches
  at::Tensor positions{};  // (B, N, 3) int64 (t, y, x); unused for text
  at::Tensor padding{};    // (B, N) bool, true = padding; undefined: none
};

struct MultimodalInput {
  std::array<std::optional<ModalityInput>, modalities::kModalityCount> modalities;  // indexed by Modality
  // (B, M) bool, on the host: which rows run which stack is read there without waiting for the device
  // (fusion/strategies.h); a tensor on the device is accepted and copied to the host once. Undefined: every given
  // modality is present in every sample.
  at::Tensor present;
};

struct MultimodalOutput {
  ModalityTensors tokens;      // (B, N_m, C) stack outputs, zero rows where absent; undefined when not given
  ModalityTensors embeddings;  // (B, E) L2-normalised, zero rows where absent; undefined when not given
  at::Tensor joint;            // (B, E) L2-normalised joint embedding
  at::Tensor lm_logits;        // (B, L, vocab), zero rows where text is absent; undefined without text
  at::Tensor present;          // (B, M) bool on the host, as used
};

// One line of `longnet model summary`.
struct ComponentCost {
  std::string name;        // "encoder.text", "stack.image", "fusion.concat_seq", "heads"
  int64_t parameters = 0;  // distinct trainable values
  double forward_flops = 0;  // one sample at the given lengths (matmuls and attention products)
};

class MultimodalModelImpl : public torch::nn::Module {
 public:
  // Throws ConfigError when no modality is enabled or a part rejects its configuration.
  MultimodalModelImpl(const ModelConfig& model, const AttentionConfig& attention, const MultimodalConfig& config);

  // Throws DataError for malformed inputs (shapes, a modality given that is not enabled, presence flags for a
  // modality that is not given, a sample without any modality).
  MultimodalOutput forward(const MultimodalInput& input);
  // The encoders' value checks (ModalityEncoder::check_ranges) on a batch still on the host: forward makes them only
  // for CPU tensors, since reading a device tensor's extremes would make the host wait. Throws DataError.
  void check_ranges(const MultimodalInput& host_input) const;

  // Per component, for one sample whose modalities have lengths[m] tokens (0: absent; disabled modalities are left
  // out). FLOPs are forward only; a training step costs about three times as much.
  std::vector<ComponentCost> summary(const std::array<int64_t, modalities::kModalityCount>& lengths) const;
  int64_t num_parameters() const;

  const MultimodalConfig& config() const { return config_; }
  const ModelConfig& model_config() const { return model_; }
  FusionStrategyImpl& fusion() { return *fusion_; }

 private:
  MultimodalOutput forward_batch(const MultimodalInput& input);  // input.present on the host or undefined
  // encoder → stack → norm of modality m on the given rows: (G, N, C).
  at::Tensor run_stack(modalities::Modality m, const ModalityInput& input, const at::Tensor& rows);

  ModelConfig model_;
  AttentionConfig attention_;
  MultimodalConfig config_;
  std::array<AttentionConfig, modalities::kModalityCount> stack_attention_;
  std::array<modalities::ModalityEncoder, modalities::kModalityCount> encoders_{nullptr, nullptr, nullptr, nullptr};
  std::array<std::vector<TransformerBlock>, modalities::kModalityCount> stacks_;
  // After each stack's last block: a 16-bit stream stays 16-bit (LayerNorm::forward_keeping_dtype).
  std::array<LayerNorm, modalities::kModalityCount> stack_norms_{nullptr, nullptr, nullptr, nullptr};
  std::shared_ptr<FusionStrategyImpl> fusion_;
  std::array<longnet::Linear, modalities::kModalityCount> projections_{nullptr, nullptr, nullptr, nullptr};
  longnet::Linear joint_projection_{nullptr};
};

TORCH_MODULE(MultimodalModel);

}  // namespace longnet::fusion
