// Configuration of the LongNet model: width, depth and the transformer block. Set from [model] in experiment files.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace longnet::fusion {

// gelu: exact (erf) GELU; gelu_tanh: its tanh approximation, which CUDA runs in the GEMM epilogues (fusion/gelu_mlp.h)
enum class MlpKind { gelu, gelu_tanh, swiglu };
// Their names in experiment files ([model] mlp), in enum order.
inline constexpr std::array<const char*, 3> kMlpKindNames{"gelu", "gelu_tanh", "swiglu"};
inline const char* to_string(MlpKind kind) { return kMlpKindNames[static_cast<size_t>(kind)]; }

struct ModelConfig {
  int64_t width = 256;           // C
  int64_t depth = 4;             // blocks
  int64_t heads = 8;             // H (query heads)
  int64_t kv_heads = 8;          // Hkv; H % Hkv == 0 (grouped-query / multi-query attention when smaller)
  MlpKind mlp = MlpKind::gelu;
  double mlp_ratio = 4.0;        // hidden width of the MLP / C (SwiGLU uses 2/3 of it per gate, as LLaMA does)
  double dropout = 0.0;          // after attention and MLP, in [0, 1)
  bool sub_layernorm = false;    // Magneto sub-LayerNorm inside attention and MLP (arXiv:2210.06423)
  int64_t vocab_size = 256;      // text vocabulary (256: raw bytes)
  int64_t max_length = 4096;     // longest sequence the model is built for (learned positions, bias tables)
  // Blocks keep only their input for the backward pass and rerun their forward there (fusion/checkpoint.h): less
  // memory for about a third more compute.
  bool activation_checkpointing = false;
  // Under autocast, the residual stream between the blocks is kept in the autocast dtype (bf16) instead of float32,
  // as Megatron-LM does by default: each residual add is rounded to it, and the pre-norms (fusion/layer_norm.h) move
  // a third less memory forward and half as much backward. The norm after a stack's last block then also returns
  // that dtype (and what reads it: the fusion input, the pooled embeddings, the LM head's input), where float32 came
  // out before. Without autocast it changes nothing.
  bool autocast_residual = false;
};

}  // namespace longnet::fusion
