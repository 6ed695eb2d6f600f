#include "attention/autograd_gcc_warnings.h"  // first: its pragmas cover every later include
#include "modalities/encoders.h"

#include <string>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/nn/init.h>

#include "core/error.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/custom_function.h>

#include "modalities/kernels/position_sum.h"
#endif

namespace longnet::modalities {
namespace {

#ifdef LONGNET_WITH_CUDA

// (h + modality) + the sum of the tables' rows at each token's positions, float32 (B, N, C), in one kernel forward.
// Backward: h's gradient is the output's (in h's dtype), the modality embedding's its sum over the tokens, and each
// table's torch's embedding backward on its axis.
class PositionSumFunction : public torch::autograd::Function<PositionSumFunction> {
 public:
  // t0..t2: the axes' tables (the first again where the modality has fewer); positions (rows, axes) int64.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h, const at::Tensor& modality,
                            const at::Tensor& t0, const at::Tensor& t1, const at::Tensor& t2,
                            const at::Tensor& positions) {
    const c10::cuda::CUDAGuard guard(h.device());
    const int64_t c = modality.size(0), rows = h.numel() / c;
    const auto hc = h.contiguous();
    auto out = at::empty({rows, c}, h.options().dtype(at::kFloat));
    kernels::PositionSumParams p;
    p.h = hc.data_ptr();
    p.h_dtype = hc.scalar_type() == at::kFloat  ? kernels::ElementType::float32
                : hc.scalar_type() == at::kHalf ? kernels::ElementType::float16
                                                : kernels::ElementType::bfloat16;
    p.modality = modality.data_ptr<float>();
    const at::Tensor* tables[] = {&t0, &t1, &t2};
    p.axes = static_cast<int>(positions.size(1));
    for (int a = 0; a < p.axes; ++a) p.tables[a] = tables[a]->data_ptr<float>();
    p.table_rows = t0.size(0);
    p.positions = positions.data_ptr<int64_t>();
    p.position_stride = positions.stride(0);
    p.out = out.data_ptr<float>();
    p.rows = rows;
    p.width = c;
    p.stream = at::cuda::getCurrentCUDAStream(h.get_device()).stream();
    kernels::launch_position_sum(p);
    ctx->save_for_backward({positions});
    ctx->saved_data["h_dtype"] = static_cast<int64_t>(h.scalar_type());
    ctx->saved_data["h_shape"] = h.sizes().vec();
    ctx->saved_data["table_rows"] = t0.size(0);
    auto shape = h.sizes().vec();
    shape.back() = c;
    return out.view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor positions = ctx->get_saved_variables()[0];
    const auto shape = ctx->saved_data["h_shape"].toIntVector();
    const int64_t c = shape.back(), rows = positions.size(0);
    const at::Tensor d = grads[0].defined() ? grads[0].reshape({rows, c}).to(at::kFloat)
                                            : at::zeros({rows, c}, positions.options().dtype(at::kFloat));
    torch::autograd::variable_list out(6);
    if (ctx->needs_input_grad(0)) {
      out[0] = d.to(static_cast<at::ScalarType>(ctx->saved_data["h_dtype"].toInt())).view(shape);
    }
    if (ctx->needs_input_grad(1)) out[1] = d.sum(0);
    const int64_t table_rows = ctx->saved_data["table_rows"].toInt();
    for (int64_t a = 0; a < positions.size(1); ++a) {
      if (!ctx->needs_input_grad(static_cast<size_t>(2 + a))) continue;
      out[static_cast<size_t>(2 + a)] =
          at::embedding_dense_backward(d, positions.select(1, a).contiguous(), table_rows, -1, false);
    }
    return out;
  }
};

#endif  // LONGNET_WITH_CUDA

}  // namespace

std::string to_string(Modality modality) {
  switch (modality) {
    case Modality::text: return "text";
    case Modality::image: return "image";
    case Modality::video: return "video";
    case Modality::audio: return "audio";
  }
  return "unknown";
}

std::optional<Modality> parse_modality(std::string_view name) {
  for (Modality m : kAllModalities) {
    if (to_string(m) == name) return m;
  }
  return std::nullopt;
}

int64_t position_axes(Modality modality) {
  switch (modality) {
    case Modality::image: return 2;
    case Modality::video: return 3;
    case Modality::text:
    case Modality::audio: return 1;
  }
  return 1;
}

PositionalKind parse_positional_kind(const std::string& name) {
  if (name == "learned") return PositionalKind::learned;
  if (name == "sinusoidal") return PositionalKind::sinusoidal;
  throw ConfigError("positional encoding must be \"learned\" or \"sinusoidal\", got \"" + name + "\"");
}

std::string to_string(PositionalKind kind) { return kind == PositionalKind::learned ? "learned" : "sinusoidal"; }

at::Tensor sinusoidal_encoding(const at::Tensor& positions, int64_t dim, double base) {
  if (dim < 1) throw Error("sinusoidal_encoding: dim must be >= 1, got " + std::to_string(dim));
  const auto f64 = positions.options().dtype(at::kDouble);
  // Channel j uses frequency base^(-2·floor(j/2)/dim): pairs (sin, cos) share one frequency.
  const at::Tensor pair = at::arange(dim, f64).div(2).floor();
  const at::Tensor freq = at::pow(base, pair.mul(-2.0 / static_cast<double>(dim)));  // (dim)
  const at::Tensor angle = positions.to(at::kDouble).unsqueeze(-1) * freq;          // (..., dim)
  const at::Tensor even = at::arange(dim, positions.options().dtype(at::kLong)).remainder(2).eq(0);
  return at::where(even, at::sin(angle), at::cos(angle));
}

void EncoderOptions::validate() const {
  const std::string name = to_string(modality);
  if (width < 1) throw ConfigError(name + " encoder: width must be >= 1, got " + std::to_string(width));
  if (input_dim < 1) {
    throw ConfigError(name + " encoder: " + (modality == Modality::text ? "vocab_size" : "patch_dim") +
                      " must be >= 1, got " + std::to_string(input_dim));
  }
  if (max_positions < 1) {
    throw ConfigError(name + " encoder: max_positions must be >= 1, got " + std::to_string(max_positions));
  }
}

ModalityEncoderImpl::ModalityEncoderImpl(const EncoderOptions& options) : options_(options) {
  options_.validate();
  const int64_t c = options_.width;
  if (options_.modality == Modality::text) {
    tokens_ = register_module("tokens", torch::nn::Embedding(options_.input_dim, c));
    // GPT-2's N(0, 0.02): the table doubles as a tied LM head, whose logits should start near uniform.
    torch::nn::init::normal_(tokens_->weight, 0.0, 0.02);
  } else {
    if (options_.modality == Modality::audio) {
      patch_norm_ = register_module(
          "patch_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({options_.input_dim}).elementwise_affine(false)));
    }
    patches_ = register_module("patches", longnet::Linear(options_.input_dim, c));
  }
  modality_embedding_ = register_parameter("modality_embedding", torch::randn({c}) * 0.02);
  if (options_.positional == PositionalKind::learned) {
    for (int64_t axis = 0; axis < position_axes(options_.modality); ++axis) {
      auto table = register_module("position" + std::to_string(axis), torch::nn::Embedding(options_.max_positions, c));
      torch::nn::init::normal_(table->weight, 0.0, 0.02);
      position_tables_.push_back(table);
    }
  }
}

at::Tensor ModalityEncoderImpl::positional(const at::Tensor& axis_positions, at::ScalarType dtype) {
  const int64_t axes = axis_positions.size(-1), c = options_.width;
  at::Tensor out;
  if (options_.positional == PositionalKind::learned) {
    for (int64_t a = 0; a < axes; ++a) {
      at::Tensor e = position_tables_[static_cast<size_t>(a)](axis_positions.select(-1, a));
      out = out.defined() ? out + e : e;
    }
    return out;
  }
  // Channel blocks per axis; the first takes the remainder so that every channel is used.
  std::vector<at::Tensor> blocks;
  const int64_t share = c / axes;
  for (int64_t a = 0; a < axes; ++a) {
    const int64_t dim = a == 0 ? c - share * (axes - 1) : share;
    if (dim > 0) blocks.push_back(sinusoidal_encoding(axis_positions.select(-1, a), dim));
  }
  return at::cat(blocks, -1).to(dtype);
}

at::Tensor ModalityEncoderImpl::forward(const at::Tensor& input, const at::Tensor& positions) {
  const std::string name = to_string(options_.modality) + " encoder";
  const int64_t max_pos = options_.max_positions;
  at::Tensor h, axis_positions;  // (B, N, C), (B, N, axes)
  if (options_.modality == Modality::text) {
    if (input.dim() != 2 || input.scalar_type() != at::kLong) {
      throw DataError(name + ": ids must be (B, L) int64, got " + std::to_string(input.dim()) + " dims of " +
                      std::string(c10::toString(input.scalar_type())));
    }
    if (input.size(1) > max_pos) {
      throw DataError(name + ": " + std::to_string(input.size(1)) + " tokens exceed max_positions = " +
                      std::to_string(max_pos));
    }
    if (input.is_cpu()) check_ranges(input, positions);
    h = tokens_(input);
    axis_positions = at::arange(input.size(1), input.options()).view({1, -1, 1}).expand({input.size(0), -1, 1});
  } else {
    if (input.dim() != 3 || input.size(2) != options_.input_dim || !at::isFloatingType(input.scalar_type())) {
      throw DataError(name + ": patches must be (B, N, " + std::to_string(options_.input_dim) + ") float, got shape " +
                      c10::str(input.sizes()) + " of " + std::string(c10::toString(input.scalar_type())));
    }
    if (!positions.defined() || positions.dim() != 3 || positions.size(0) != input.size(0) ||
        positions.size(1) != input.size(1) || positions.size(2) != 3 || positions.scalar_type() != at::kLong) {
      throw DataError(name + ": positions must be (B, N, 3) int64 (t, y, x) matching the patches " +
                      c10::str(input.sizes()));
    }
    axis_positions = used_positions(positions);
    if (positions.is_cpu()) check_ranges(input, positions);
    // Under autocast the projection casts its input to the autocast type: the patches go there directly rather than
    // through a float32 copy of the largest input of the model (a float16 batch converts exactly either way). The
    // audio patch norm runs in float32 under autocast, so its input stays float32.
    const auto device = input.device().type();
    const bool autocast = !patch_norm_ && at::autocast::is_autocast_available(device) &&
                          at::autocast::is_autocast_enabled(device);
    const at::Tensor values =
        input.to(autocast ? at::autocast::get_autocast_dtype(device) : patches_->weight.scalar_type());
    h = patches_(patch_norm_ ? patch_norm_(values) : values);
  }
  if (const at::Tensor fused = fused_learned_sum(h, axis_positions); fused.defined()) return fused;
  return h + modality_embedding_ + positional(axis_positions, h.scalar_type());
}

at::Tensor ModalityEncoderImpl::fused_learned_sum(const at::Tensor& h, const at::Tensor& axis_positions) {
#ifdef LONGNET_WITH_CUDA
  const int64_t c = options_.width, axes = axis_positions.size(-1);
  const auto is_float32_here = [&h](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.device() == h.device() && t.is_contiguous();
  };
  bool takes = options_.positional == PositionalKind::learned && h.is_cuda() && c % 4 == 0 && h.size(-1) == c &&
               (h.scalar_type() == at::kFloat || h.scalar_type() == at::kHalf || h.scalar_type() == at::kBFloat16) &&
               is_float32_here(modality_embedding_) && axes >= 1 &&
               axes <= kernels::kMaxPositionAxes && axes == static_cast<int64_t>(position_tables_.size()) &&
               axis_positions.device() == h.device();
  for (int64_t a = 0; takes && a < axes; ++a) takes = is_float32_here(position_tables_[static_cast<size_t>(a)]->weight);
  if (!takes) return {};
  // (rows, axes) with unit stride along the axes: a view of the (B, N, 3) triples, or a copy of broadcast positions.
  at::Tensor positions = axis_positions.reshape({-1, axes});
  if (positions.stride(1) != 1) positions = positions.contiguous();
  // Autograd takes defined inputs only: a modality with fewer axes passes its first table again (not read).
  const auto table = [this, axes](int64_t a) {
    return position_tables_[static_cast<size_t>(a < axes ? a : 0)]->weight;
  };
  return PositionSumFunction::apply(h, modality_embedding_, table(0), table(1), table(2), positions);
#else
  (void)h, (void)axis_positions;
  return {};
#endif
}

at::Tensor ModalityEncoderImpl::used_positions(const at::Tensor& positions) const {
  switch (options_.modality) {
    case Modality::image: return positions.narrow(2, 1, 2);  // (y, x)
    case Modality::video: return positions;                  // (t, y, x)
    default: return positions.narrow(2, 0, 1);              // t
  }
}

void ModalityEncoderImpl::check_ranges(const at::Tensor& input, const at::Tensor& positions) const {
  const std::string name = to_string(options_.modality) + " encoder";
  auto check = [&](const at::Tensor& values, int64_t end, const std::string& what, const std::string& range) {
    if (values.numel() == 0) return;
    const int64_t lo = values.min().item<int64_t>(), hi = values.max().item<int64_t>();
    if (lo < 0 || hi >= end) {
      throw DataError(name + ": " + what + " " + std::to_string(lo < 0 ? lo : hi) + " outside " + range);
    }
  };
  const int64_t max_pos = options_.max_positions;
  if (options_.modality == Modality::text) {
    check(input, options_.input_dim, "token id", "the vocabulary [0, " + std::to_string(options_.input_dim) + ")");
  } else if (positions.defined() && positions.dim() == 3 && positions.size(2) == 3) {
    check(used_positions(positions), max_pos, "position", "[0, " + std::to_string(max_pos) + ") (max_positions)");
  }
}

const at::Tensor& ModalityEncoderImpl::embedding_weight() const {
  return options_.modality == Modality::text ? tokens_->weight : patches_->weight;
}

int64_t ModalityEncoderImpl::num_parameters() const {
  int64_t total = 0;
  for (const auto& p : parameters()) total += p.numel();
  return total;
}

double ModalityEncoderImpl::forward_flops(int64_t n) const {
  if (options_.modality == Modality::text) return 0.0;
  return 2.0 * static_cast<double>(n) * static_cast<double>(options_.input_dim) * static_cast<double>(options_.width);
}

}  // namespace longnet::modalities
