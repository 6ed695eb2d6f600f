#include "fusion/multimodal_model.h"

#include <string>
#include <utility>

#include <ATen/ATen.h>

#include "core/device_copy.h"
#include "core/error.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace longnet::fusion {

using modalities::kAllModalities;
using modalities::kModalityCount;
using modalities::Modality;

namespace {

size_t idx(Modality m) { return static_cast<size_t>(m); }
int64_t col(Modality m) { return static_cast<int64_t>(m); }

at::Tensor l2_normalise(const at::Tensor& x) { return x / x.norm(2, -1, true).clamp_min(1e-12); }

at::Tensor zero_absent(const at::Tensor& x, const at::Tensor& present_column) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = x.size(0);
  return at::where(present_column.view(shape), x, at::zeros({}, x.options()));
}

int64_t count_parameters(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters()) total += p.numel();
  return total;
}

}  // namespace

MultimodalModelImpl::MultimodalModelImpl(const ModelConfig& model, const AttentionConfig& attention,
                                         const MultimodalConfig& config)
    : model_(model), attention_(attention), config_(config) {
  if (!config_.any_enabled()) throw ConfigError("multimodal model: no modality is enabled in [modalities.*]");
  const int64_t c = model_.width, e = config_.fusion.embed_dim;
  if (e < 1) throw ConfigError("fusion.embed_dim must be >= 1, got " + std::to_string(e));
  StrategyContext ctx{.model = model_, .attention = attention_, .fusion = config_.fusion};
  for (Modality m : kAllModalities) {
    const ModalityConfig& mc = config_[m];
    ctx.enabled[idx(m)] = mc.enabled;
    if (!mc.enabled) continue;
    const std::string name = modalities::to_string(m);
    encoders_[idx(m)] = register_module(
        "encoder_" + name, modalities::ModalityEncoder(modalities::EncoderOptions{
                               .modality = m, .width = c, .input_dim = mc.input_dim, .positional = mc.positional,
                               .max_positions = mc.max_positions}));
    AttentionConfig a = attention_;
    a.dilated.segment_lengths = mc.segment_lengths;
    a.dilated.dilation_rates = mc.dilation_rates;
    a.dilated.causal = m == Modality::text;  // the LM head reads the text stack
    stack_attention_[idx(m)] = a;
    for (int64_t i = 0; i < mc.depth; ++i) {
      stacks_[idx(m)].push_back(
          register_module("stack_" + name + "_block" + std::to_string(i), TransformerBlock(model_, a)));
    }
    stack_norms_[idx(m)] = register_module("stack_" + name + "_norm", LayerNorm(torch::nn::LayerNormOptions({c})));
    projections_[idx(m)] = register_module("projection_" + name, longnet::Linear(c, e));
  }
  fusion_ = register_module("fusion", make_strategy(ctx));
  joint_projection_ = register_module("joint_projection", longnet::Linear(c, e));
}

at::Tensor MultimodalModelImpl::run_stack(Modality m, const ModalityInput& input, const at::Tensor& rows) {
  const at::Tensor data = take_rows(input.data, rows);
  const at::Tensor positions = input.positions.defined() ? take_rows(input.positions, rows) : at::Tensor();
  std::optional<at::Tensor> padding;
  if (input.padding.defined()) padding = take_rows(input.padding, rows);
  const at::Tensor h = encoders_[idx(m)](data, positions);
  return stack_norms_[idx(m)]->forward_keeping_dtype(run_blocks(stacks_[idx(m)], h, padding).value());
}

void MultimodalModelImpl::check_ranges(const MultimodalInput& host_input) const {
  for (Modality m : kAllModalities) {
    const auto& mi = host_input.modalities[idx(m)];
    if (mi && encoders_[idx(m)]) encoders_[idx(m)]->check_ranges(mi->data, mi->positions);
  }
}

MultimodalOutput MultimodalModelImpl::forward(const MultimodalInput& given) {
  MultimodalInput input = given;
  if (input.present.defined()) input.present = input.present.cpu();  // the one wait when it is on the device
  int64_t batch = input.present.defined() ? input.present.size(0) : -1;
  for (const auto& mi : input.modalities) {
    if (batch < 0 && mi) batch = mi->data.size(0);
  }
  if (!config_.fusion.batch_invariant || batch <= 1) return forward_batch(input);

  // One sample at a time (see the header): each sample sees exactly the shapes it would see alone.
  std::vector<MultimodalOutput> parts;
  for (int64_t b = 0; b < batch; ++b) {
    MultimodalInput one;
    for (size_t m = 0; m < input.modalities.size(); ++m) {
      if (!input.modalities[m]) continue;
      const ModalityInput& mi = *input.modalities[m];
      auto row = [b](const at::Tensor& t) { return t.defined() ? t.narrow(0, b, 1) : t; };
      one.modalities[m] = ModalityInput{.data = row(mi.data), .positions = row(mi.positions), .padding = row(mi.padding)};
    }
    if (input.present.defined()) one.present = input.present.narrow(0, b, 1);
    parts.push_back(forward_batch(one));
  }
  auto cat = [&parts](auto field) {
    std::vector<at::Tensor> ts;
    for (auto& p : parts) ts.push_back(field(p));
    return ts.front().defined() ? at::cat(ts, 0) : at::Tensor();
  };
  MultimodalOutput out;
  for (size_t m = 0; m < out.tokens.size(); ++m) {
    out.tokens[m] = cat([m](MultimodalOutput& p) { return p.tokens[m]; });
    out.embeddings[m] = cat([m](MultimodalOutput& p) { return p.embeddings[m]; });
  }
  out.joint = cat([](MultimodalOutput& p) { return p.joint; });
  out.lm_logits = cat([](MultimodalOutput& p) { return p.lm_logits; });
  out.present = cat([](MultimodalOutput& p) { return p.present; });
  return out;
}

MultimodalOutput MultimodalModelImpl::forward_batch(const MultimodalInput& input) {
  // ---- validate and resolve presence --------------------------------------------------------------------------------
  int64_t batch = input.present.defined() ? input.present.size(0) : -1;
  at::Device device = at::kCPU;
  for (Modality m : kAllModalities) {
    const auto& mi = input.modalities[idx(m)];
    if (!mi) continue;
    const std::string name = modalities::to_string(m);
    if (!config_[m].enabled) throw DataError("multimodal model: input for modality " + name + ", which is not enabled");
    if (!mi->data.defined() || mi->data.dim() < 2) throw DataError("multimodal model: " + name + " data must be batched");
    if (batch < 0) batch = mi->data.size(0);
    if (mi->data.size(0) != batch) {
      throw DataError("multimodal model: " + name + " has " + std::to_string(mi->data.size(0)) + " samples, expected " +
                      std::to_string(batch));
    }
    if (mi->padding.defined() && (mi->padding.dim() != 2 || mi->padding.size(0) != batch ||
                                  mi->padding.size(1) != mi->data.size(1) || mi->padding.scalar_type() != at::kBool)) {
      throw DataError("multimodal model: " + name + " padding must be (B, N) bool matching its data");
    }
    device = mi->data.device();
  }
  if (batch < 0) throw DataError("multimodal model: the input has no modality");
  at::Tensor present = input.present;
  if (!present.defined()) {
    present = at::zeros({batch, kModalityCount}, at::kBool);
    for (Modality m : kAllModalities) {
      if (input.modalities[idx(m)]) present.select(1, col(m)).fill_(true);
    }
  }
  if (present.dim() != 2 || present.size(1) != kModalityCount || present.scalar_type() != at::kBool) {
    throw DataError("multimodal model: present must be (B, " + std::to_string(kModalityCount) + ") bool");
  }
  for (Modality m : kAllModalities) {
    if (!input.modalities[idx(m)] && present.select(1, col(m)).any().item<bool>()) {
      throw DataError("multimodal model: present marks modality " + modalities::to_string(m) +
                      " in some sample, but the input has none of it");
    }
  }
  if (!present.any(1).all().item<bool>()) throw DataError("multimodal model: a sample has no present modality");

  // ---- per-modality stacks on their present rows ----------------------------------------------------------------------
  const at::TensorOptions opts = joint_projection_->weight.options();
  std::vector<Modality> to_run;
  std::array<at::Tensor, kModalityCount> rows, results;
  for (Modality m : kAllModalities) {
    if (!input.modalities[idx(m)]) continue;
    const at::Tensor host_rows = present.select(1, col(m)).nonzero().squeeze(1);
    if (host_rows.size(0) == 0) continue;
    rows[idx(m)] = to_device_async(host_rows, device);
    to_run.push_back(m);
  }
  bool ran_in_parallel = false;
#ifdef LONGNET_WITH_CUDA
  if (config_.fusion.parallel_stacks && device.is_cuda() && to_run.size() > 1) {
    ran_in_parallel = true;
    const c10::cuda::CUDAStream main_stream = c10::cuda::getCurrentCUDAStream(device.index());
    at::cuda::CUDAEvent inputs_ready;
    inputs_ready.record(main_stream);
    std::vector<at::cuda::CUDAEvent> done(to_run.size());
    for (size_t i = 0; i < to_run.size(); ++i) {
      const Modality m = to_run[i];
      const c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool(false, device.index());
      inputs_ready.block(stream);
      {
        c10::cuda::CUDAStreamGuard guard(stream);
        const ModalityInput& mi = *input.modalities[idx(m)];
        // The inputs were allocated on the main stream: their memory must not be reused before this stream is done.
        for (const at::Tensor* t : {&mi.data, &mi.positions, &mi.padding, static_cast<const at::Tensor*>(&rows[idx(m)])}) {
          if (t->defined()) t->record_stream(stream);
        }
        results[idx(m)] = run_stack(m, mi, rows[idx(m)]);
      }
      done[i].record(stream);
    }
    for (size_t i = 0; i < to_run.size(); ++i) {
      done[i].block(main_stream);
      // Allocated on a side stream and used on the main one from here on.
      results[idx(to_run[i])].record_stream(main_stream);
    }
  }
#endif
  if (!ran_in_parallel) {
    // Without CUDA streams (CPU, a build without CUDA, or a single stack) the stacks run one after another.
    for (Modality m : to_run) results[idx(m)] = run_stack(m, *input.modalities[idx(m)], rows[idx(m)]);
  }

  // Zeros for absent rows in the stacks' output type (16-bit with autocast_residual), so that every modality's tokens
  // share one type.
  at::TensorOptions token_options = opts;
  for (const at::Tensor& r : results) {
    if (r.defined()) {
      token_options = r.options();
      break;
    }
  }
  MultimodalOutput out;
  out.present = present;
  FusionInput fusion_in;
  fusion_in.present = present;
  for (Modality m : kAllModalities) {
    const auto& mi = input.modalities[idx(m)];
    if (!mi) continue;
    // Scatter into zeros: absent rows never saw a computation and stay exactly zero. (With every row present the
    // stack's result is the whole tensor.)
    const at::Tensor& result = results[idx(m)];
    const bool all = result.defined() && rows[idx(m)].size(0) == batch;
    at::Tensor tokens = all ? result : at::zeros({batch, mi->data.size(1), model_.width}, token_options);
    if (result.defined() && !all) tokens = tokens.index_copy(0, rows[idx(m)], result);
    out.tokens[idx(m)] = tokens;
    fusion_in.tokens[idx(m)] = tokens;
    fusion_in.padding[idx(m)] = mi->padding;
  }

  // ---- fusion and heads ------------------------------------------------------------------------------------------------
  out.joint = l2_normalise(joint_projection_(fusion_->forward(fusion_in)));
  const at::Tensor present_on_device = to_device_async(present, device);  // masks the heads' absent rows
  for (Modality m : kAllModalities) {
    if (!out.tokens[idx(m)].defined()) continue;
    const at::Tensor pooled = masked_mean(out.tokens[idx(m)], fusion_in.padding[idx(m)]);
    out.embeddings[idx(m)] =
        zero_absent(l2_normalise(projections_[idx(m)](pooled)), present_on_device.select(1, col(m)));
  }
  if (out.tokens[idx(Modality::text)].defined()) {
    const at::Tensor logits = at::linear(out.tokens[idx(Modality::text)],
                                         encoders_[idx(Modality::text)]->embedding_weight());
    out.lm_logits = zero_absent(logits, present_on_device.select(1, col(Modality::text)));
  }
  return out;
}

std::vector<ComponentCost> MultimodalModelImpl::summary(const std::array<int64_t, kModalityCount>& lengths) const {
  std::vector<ComponentCost> out;
  const int64_t c = model_.width, e = config_.fusion.embed_dim;
  std::array<int64_t, kModalityCount> used{};
  double head_flops = 2.0 * static_cast<double>(c * e);  // joint projection
  int64_t head_params = count_parameters(*joint_projection_);
  for (Modality m : kAllModalities) {
    if (!config_[m].enabled) continue;
    const std::string name = modalities::to_string(m);
    const int64_t n = lengths[idx(m)];
    if (n < 0) throw Error("model summary: length of " + name + " must be >= 0, got " + std::to_string(n));
    used[idx(m)] = n;
    out.push_back({"encoder." + name, encoders_[idx(m)]->num_parameters(), encoders_[idx(m)]->forward_flops(n)});
    ComponentCost stack{"stack." + name, count_parameters(*stack_norms_[idx(m)]), 0.0};
    for (const auto& block : stacks_[idx(m)]) {
      stack.parameters += count_parameters(*block);
      if (n > 0) stack.forward_flops += block_forward_flops(*block, model_, &stack_attention_[idx(m)].dilated, n);
    }
    out.push_back(stack);
    head_params += count_parameters(*projections_[idx(m)]);
    if (n > 0) head_flops += 2.0 * static_cast<double>(c * e);
    if (m == Modality::text) head_flops += 2.0 * static_cast<double>(n * c * config_[m].input_dim);  // tied LM head
  }
  out.push_back({"fusion." + config_.fusion.strategy, count_parameters(*fusion_), fusion_->forward_flops(used)});
  out.push_back({"heads", head_params, head_flops});
  return out;
}

int64_t MultimodalModelImpl::num_parameters() const { return count_parameters(*this); }

}  // namespace longnet::fusion
