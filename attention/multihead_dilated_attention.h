// Multi-head dilated attention: the attention layer of every LongNet block (arXiv:2307.02486 §2.3). Projects
// x (B, N, C) to queries (H heads) and keys/values (Hkv heads; grouped-query or multi-query attention when Hkv < H),
// applies the position encoding, runs `dilated_attention` and projects back to C.
//
//   MultiheadDilatedAttention attn(MultiheadDilatedAttentionOptions{
//       .embed_dim = 256, .heads = 8, .kv_heads = 2,
//       .dilated = {.segment_lengths = {512, 1024}, .dilation_rates = {1, 2}, .causal = true},
//       .position = PositionEncoding::rope});
//   auto y = attn(x);                          // x: (B, N, C) → y: (B, N, C)
//   auto z = attn(x, key_padding_mask);        // key_padding_mask: (B, N) bool, true = padding
//
// Steps of forward (x: (B, N, C)):
//   q = Wq x: (B, N, H, D), k = Wk x, v = Wv x: (B, N, Hkv, D)       D = C / H, one GEMM (split_qkv)
//   qk_layernorm: LayerNorm over D, one for q and one for k (shared by the heads)
//   rope:  q, k rotated by angle n·θ^(-2i/D) on the pairs (i, i + D/2) for absolute position n (Su et al. 2021)
//   xpos:  rope, then q scaled by ζ_i^(n/γ) and k by ζ_i^(-n/γ), ζ_i = (2i/D + 0.4) / 1.4, γ = xpos_scale_base
//          (Sun et al. 2022). n is counted from the middle of the sequence: q·k only sees ζ^((m-n)/γ), so the shift
//          changes nothing but halves the exponent, which would otherwise overflow float32 beyond ~30k tokens.
//   relative_bias: a learned table (H, num_buckets) of T5 bucket biases added to the scores inside the attention
//          (bidirectional unless causal)
//   o = dilated_attention(q, k, v): (B, N, H, D) → (B, N, C), dropout(o), sub_layernorm: LayerNorm(o) (Magneto),
//   y = Wo o
// Without qk_layernorm or a sequence shard, the projection goes to dilated_attention_packed whole, which for the
// fused backend reads the slots in place and rotates q and k itself (the same result; dilated_attention.h).
//
// Options against backends (DilatedAttentionConfig::backend; `auto` resolves per dilated_attention.h):
//   option                          reference   flash
//   position none / rope / xpos     yes         yes      (applied to q, k before the attention call)
//   position relative_bias          yes         no       (the bias enters the scores; flash has no bias input)
//   qk_layernorm, sub_layernorm     yes         yes
//   dropout, GQA / MQA (Hkv < H)    yes         yes
//   key_padding_mask                as dilated_attention supports it
//   head dim D = C / H              any         ≤ 256, multiple of 8 (checked by dilated_attention at the call)
// An unsupported combination throws ConfigError at construction naming the option and the backend; nothing falls
// back to another backend silently. With backend `auto`, relative_bias resolves to `reference`.
//
// Thread safety: as any torch module: concurrent forward calls are safe; changing parameters or train/eval mode
// meanwhile is not.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "attention/dilated_attention.h"
#include "attention/positional.h"
#include "core/linear.h"

namespace longnet::attention {

enum class PositionEncoding { none, rope, xpos, relative_bias };

// "none" | "rope" | "xpos" | "relative_bias"; anything else is a ConfigError listing these.
PositionEncoding parse_position_encoding(const std::string& name);
std::string to_string(PositionEncoding position);

struct MultiheadDilatedAttentionOptions {
  int64_t embed_dim = 256;  // C; C % H == 0
  int64_t heads = 8;        // H query heads
  int64_t kv_heads = 8;     // Hkv key/value heads; H % Hkv == 0
  DilatedAttentionConfig dilated;
  PositionEncoding position = PositionEncoding::rope;
  bool qk_layernorm = false;     // LayerNorm of q and k over D (stabilises attention logits)
  double dropout = 0.0;          // on the attention output before the out projection, in [0, 1)
  bool bias = true;              // biases of the q, k, v and out projections
  bool sub_layernorm = false;    // Magneto: LayerNorm before the out projection (arXiv:2210.06423)
  double rope_theta = 10000.0;   // RoPE / xPos base θ
  double xpos_scale_base = 512.0;          // γ
  int64_t relative_num_buckets = 32;       // T5 buckets
  int64_t relative_max_distance = 128;     // distances beyond share the last bucket

  int64_t head_dim() const { return embed_dim / heads; }
  // Throws ConfigError for non-positive sizes, C % H, H % Hkv, odd D with rope/xpos, dropout outside [0, 1),
  // non-positive θ or γ, num_buckets < 2 (< 4 when bidirectional), an invalid dilated pattern, or an option the
  // requested backend does not support (see the table above).
  void validate() const;
};

// x holds rows [start, start + n) of a sequence of `length` tokens split across processes (sequence parallelism):
// rope and xPos count positions from `start` within the whole sequence, and the attention runs through `attend`
// instead of dilated_attention (distributed::sequence_shard binds it to a process group). `attend` must equal
// dilated_attention on the whole sequence for these rows.
struct SequenceShard {
  int64_t start = 0;
  int64_t length = 0;
  std::function<AttentionResult(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const DilatedAttentionConfig& config, const AttentionOptions& options)>
      attend;
};

class MultiheadDilatedAttentionImpl : public torch::nn::Module {
 public:
  explicit MultiheadDilatedAttentionImpl(const MultiheadDilatedAttentionOptions& options);

  // x: (B, N, C) float; key_padding_mask: (B, N) bool, true = padding → (B, N, C). With `shard`, x is that part of
  // a longer sequence (see SequenceShard).
  at::Tensor forward(const at::Tensor& x, const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                     const SequenceShard* shard = nullptr);

  // q, k after projection, qk_layernorm and position encoding: q (B, N, H, D), k (B, N, Hkv, D). Exposed so that tests
  // and tools can inspect exactly what the attention sees.
  std::pair<at::Tensor, at::Tensor> queries_and_keys(const at::Tensor& x, const SequenceShard* shard = nullptr);

  const MultiheadDilatedAttentionOptions& options() const { return options_; }
  // The relative bias as dilated_attention takes it; nullopt unless position == relative_bias.
  std::optional<RelativePositionBias> relative_bias() const;

 private:
  // The stacked projection qkv (B, N, (H + 2·Hkv)·D) and the position encoding's tables for its q and k (x already
  // in the autocast dtype).
  struct Packed {
    at::Tensor qkv;
    QkvRotation rotation{};
  };
  Packed packed_projection(const at::Tensor& x, const SequenceShard* shard);
  // The RoPE/xPos tables of positions [start, start + n) on a device in a dtype: computed once (arange, pow, cos and
  // sin in float64, the casts: several small kernels) and kept while the shapes repeat, as they do step after step.
  const QkvRotation& rotation_tables(int64_t start, int64_t n, int64_t length, c10::Device device,
                                     at::ScalarType dtype);
  // q, k, v as the attention takes them (x already in the autocast dtype).
  Qkv project(const at::Tensor& x, const SequenceShard* shard);

  MultiheadDilatedAttentionOptions options_;
  longnet::Linear q_proj_{nullptr}, k_proj_{nullptr}, v_proj_{nullptr}, out_proj_{nullptr};
  torch::nn::LayerNorm q_norm_{nullptr}, k_norm_{nullptr};  // qk_layernorm only
  torch::nn::LayerNorm sub_norm_{nullptr};                  // sub_layernorm only
  at::Tensor relative_bias_table_;                          // (H, num_buckets), relative_bias only
  struct RotationKey {
    int64_t start = -1, n = 0, length = 0;
    c10::Device device = c10::kCPU;
    at::ScalarType dtype = at::kFloat;
    bool operator==(const RotationKey&) const = default;
  };
  RotationKey rotation_key_;  // of rotation_ (start -1: none yet)
  QkvRotation rotation_;
};

TORCH_MODULE(MultiheadDilatedAttention);

}  // namespace longnet::attention
