#include "attention/multihead_dilated_attention.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/InferenceMode.h>

#include "attention/linear.h"
#include "attention/positional.h"
#include "core/error.h"

namespace longnet::attention {
namespace {

std::string shape_string(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + ")";
}

// x in the autocast dtype when autocast is on for its device and would cast it: the q, k and v projections then
// share one cast (and one gradient conversion back) instead of making one each.
at::Tensor autocast_input(const at::Tensor& x) {
  const auto device = x.device().type();
  if (!at::autocast::is_autocast_available(device) || !at::autocast::is_autocast_enabled(device)) return x;
  const auto dtype = at::autocast::get_autocast_dtype(device);
  return x.scalar_type() == at::kFloat ? x.to(dtype) : x;
}

}  // namespace

PositionEncoding parse_position_encoding(const std::string& name) {
  if (name == "none") return PositionEncoding::none;
  if (name == "rope") return PositionEncoding::rope;
  if (name == "xpos") return PositionEncoding::xpos;
  if (name == "relative_bias") return PositionEncoding::relative_bias;
  throw ConfigError("unknown position encoding '" + name + "' (expected none, rope, xpos or relative_bias)");
}

std::string to_string(PositionEncoding position) {
  switch (position) {
    case PositionEncoding::none: return "none";
    case PositionEncoding::rope: return "rope";
    case PositionEncoding::xpos: return "xpos";
    case PositionEncoding::relative_bias: return "relative_bias";
  }
  return "none";
}

void MultiheadDilatedAttentionOptions::validate() const {
  const auto fail = [](const std::string& message) { throw ConfigError("multihead dilated attention: " + message); };
  if (embed_dim < 1) fail("embed_dim must be >= 1, got " + std::to_string(embed_dim));
  if (heads < 1) fail("heads must be >= 1, got " + std::to_string(heads));
  if (kv_heads < 1) fail("kv_heads must be >= 1, got " + std::to_string(kv_heads));
  if (embed_dim % heads != 0) {
    fail("heads = " + std::to_string(heads) + " must divide embed_dim = " + std::to_string(embed_dim));
  }
  if (heads % kv_heads != 0) {
    fail("kv_heads = " + std::to_string(kv_heads) + " must divide heads = " + std::to_string(heads));
  }
  if (!(dropout >= 0.0 && dropout < 1.0)) fail("dropout must be in [0, 1), got " + std::to_string(dropout));
  dilated.validate();
  if ((position == PositionEncoding::rope || position == PositionEncoding::xpos) && head_dim() % 2 != 0) {
    fail("position = " + to_string(position) + " needs an even head dimension, got " + std::to_string(head_dim()) +
         " (embed_dim / heads)");
  }
  if (!(rope_theta > 0.0)) fail("rope_theta must be > 0, got " + std::to_string(rope_theta));
  if (!(xpos_scale_base > 0.0)) fail("xpos_scale_base must be > 0, got " + std::to_string(xpos_scale_base));
  if (position == PositionEncoding::relative_bias) {
    if (dilated.backend == Backend::flash || dilated.backend == Backend::fused) {
      throw ConfigError("attention option position = relative_bias is not supported by backend " +
                        to_string(dilated.backend) + " (its kernels take no score bias); use backend reference or auto");
    }
    const bool bidirectional = !dilated.causal;
    const int64_t min_buckets = bidirectional ? 4 : 2;  // each side needs an exact and a logarithmic half
    if (relative_num_buckets < min_buckets) {
      fail("relative_num_buckets must be >= " + std::to_string(min_buckets) + ", got " +
           std::to_string(relative_num_buckets));
    }
    const int64_t max_exact = (bidirectional ? relative_num_buckets / 2 : relative_num_buckets) / 2;
    if (relative_max_distance <= max_exact) {
      fail("relative_max_distance must exceed the " + std::to_string(max_exact) + " exactly bucketed distances, got " +
           std::to_string(relative_max_distance));
    }
  }
}

MultiheadDilatedAttentionImpl::MultiheadDilatedAttentionImpl(const MultiheadDilatedAttentionOptions& options)
    : options_(options) {
  options_.validate();
  const int64_t c = options_.embed_dim, d = options_.head_dim();
  const auto projection = [&](int64_t in, int64_t out) {
    return longnet::Linear(torch::nn::LinearOptions(in, out).bias(options_.bias));
  };
  q_proj_ = register_module("q_proj", projection(c, options_.heads * d));
  k_proj_ = register_module("k_proj", projection(c, options_.kv_heads * d));
  v_proj_ = register_module("v_proj", projection(c, options_.kv_heads * d));
  if (options_.qk_layernorm) {
    q_norm_ = register_module("q_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
    k_norm_ = register_module("k_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
  }
  if (options_.sub_layernorm) {
    sub_norm_ = register_module("sub_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c})));
  }
  out_proj_ = register_module("out_proj", projection(options_.heads * d, c));
  if (options_.position == PositionEncoding::relative_bias) {
    // Zeros: the layer starts without positional preference and learns one (T5 initialises it randomly, which only
    // adds noise to the first steps).
    relative_bias_table_ =
        register_parameter("relative_bias_table", at::zeros({options_.heads, options_.relative_num_buckets}));
  }
}

std::optional<RelativePositionBias> MultiheadDilatedAttentionImpl::relative_bias() const {
  if (options_.position != PositionEncoding::relative_bias) return std::nullopt;
  return RelativePositionBias{.table = relative_bias_table_,
                              .num_buckets = options_.relative_num_buckets,
                              .max_distance = options_.relative_max_distance,
                              .bidirectional = !options_.dilated.causal};
}

MultiheadDilatedAttentionImpl::Packed MultiheadDilatedAttentionImpl::packed_projection(const at::Tensor& x,
                                                                                     const SequenceShard* shard) {
  if (x.dim() != 3 || x.size(2) != options_.embed_dim) {
    throw Error("multihead dilated attention: x must be (B, N, C) with C = " + std::to_string(options_.embed_dim) +
                ", got " + shape_string(x.sizes()));
  }
  const int64_t n = x.size(1);
  // One GEMM for the three projections (their weights stacked): its backward is one GEMM into x's gradient instead of
  // three whose results are summed.
  const at::Tensor weight = at::cat({q_proj_->weight, k_proj_->weight, v_proj_->weight});
  const at::Tensor bias = options_.bias ? at::cat({q_proj_->bias, k_proj_->bias, v_proj_->bias}) : at::Tensor();
  Packed out{.qkv = linear(x, weight, bias)};  // (B, N, (H + 2·Hkv)·D)
  if (options_.position != PositionEncoding::rope && options_.position != PositionEncoding::xpos) return out;
  const int64_t start = shard ? shard->start : 0, length = shard ? shard->length : n;
  // The tables in apply_rotary's arithmetic type (float64 only for float64 inputs), converted once for q and k.
  const auto table_type = out.qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  out.rotation = rotation_tables(start, n, length, x.device(), table_type);
  return out;
}

const QkvRotation& MultiheadDilatedAttentionImpl::rotation_tables(int64_t start, int64_t n, int64_t length,
                                                                  c10::Device device, at::ScalarType dtype) {
  const RotationKey key{.start = start, .n = n, .length = length, .device = device, .dtype = dtype};
  if (key == rotation_key_) return rotation_;
  // Tables made in inference mode could not be saved for a later backward: those are not kept.
  const bool keep = !c10::InferenceMode::is_enabled();
  const int64_t d = options_.head_dim();
  const at::Tensor positions = at::arange(start, start + n, at::TensorOptions(device).dtype(at::kLong));  // (N,)
  const auto [cos64, sin64] = rotary_cos_sin(positions, d, options_.rope_theta);
  QkvRotation r;
  r.cos = cos64.to(dtype);
  r.sin = sin64.to(dtype);
  if (options_.position == PositionEncoding::xpos) {
    // Centred positions keep ζ^(±n/γ) within float32 range for long sequences; q·k is unchanged (see header).
    const at::Tensor centred = positions - length / 2;
    r.q_scale = xpos_scale(centred, d, options_.xpos_scale_base).to(dtype);
    r.k_scale = xpos_scale(-centred, d, options_.xpos_scale_base).to(dtype);
  }
  rotation_ = std::move(r);
  rotation_key_ = keep ? key : RotationKey{};
  return rotation_;
}

Qkv MultiheadDilatedAttentionImpl::project(const at::Tensor& x, const SequenceShard* shard) {
  const auto [qkv, rotation] = packed_projection(x, shard);
  const auto& [cos, sin, q_scale, k_scale] = rotation;
  if (!options_.qk_layernorm) return split_qkv(qkv, options_.heads, options_.kv_heads, cos, sin, q_scale, k_scale);
  Qkv out = split_qkv(qkv, options_.heads, options_.kv_heads);
  // Under autocast LayerNorm returns float32; q and k go back to v's dtype, which dilated_attention requires.
  out.q = q_norm_(out.q).to(out.v.scalar_type());
  out.k = k_norm_(out.k).to(out.v.scalar_type());
  if (cos.defined()) {
    out.q = apply_rotary(out.q, cos, sin, q_scale);
    out.k = apply_rotary(out.k, cos, sin, k_scale);
  }
  return out;
}

std::pair<at::Tensor, at::Tensor> MultiheadDilatedAttentionImpl::queries_and_keys(const at::Tensor& x,
                                                                                   const SequenceShard* shard) {
  Qkv p = project(autocast_input(x), shard);
  return {p.q, p.k};
}

at::Tensor MultiheadDilatedAttentionImpl::forward(const at::Tensor& x,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 const SequenceShard* shard) {
  const int64_t b = x.size(0), n = x.size(1), d = options_.head_dim();
  AttentionOptions attention_options;
  attention_options.key_padding_mask = key_padding_mask;
  attention_options.relative_bias = relative_bias();
  AttentionResult attended;
  if (shard || options_.qk_layernorm) {
    const auto [q, k, v] = project(autocast_input(x), shard);  // (B, N, H, D), (B, N, Hkv, D) twice
    attended = shard ? shard->attend(q, k, v, options_.dilated, attention_options)
                     : dilated_attention(q, k, v, options_.dilated, attention_options);
  } else {
    // The projection stays packed: the fused backend reads its slots in place (dilated_attention.h).
    const auto [qkv, rotation] = packed_projection(autocast_input(x), nullptr);
    attended = dilated_attention_packed(qkv, options_.heads, options_.kv_heads, rotation, options_.dilated,
                                        attention_options);
  }
  // o: (B, N, H, D) → (B, N, H·D)
  at::Tensor o = attended.out.reshape({b, n, options_.heads * d});
  o = at::dropout(o, options_.dropout, is_training());
  if (options_.sub_layernorm) o = sub_norm_(o);
  return linear(o, out_proj_->weight, out_proj_->bias);  // (B, N, C)
}

}  // namespace longnet::attention
