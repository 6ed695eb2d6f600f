#include "pipelines/multimodal_run.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <utility>

#include <sys/resource.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/torch.h>

#include "core/atomic_file.h"
#include "core/device_copy.h"
#include "core/error.h"
#include "core/keyed_random.h"
#include "core/log.h"
#include "distributed/data_parallel.h"
#include "distributed/process_group.h"
#include "fusion/losses.h"
#include "fusion/strategies.h"
#include "pipelines/loader.h"
#include "pipelines/retrieval.h"
#include "pipelines/training.h"

namespace longnet::pipelines {
namespace fs = std::filesystem;
using modalities::Modality;
using nlohmann::json;

namespace {

constexpr size_t kM = modalities::kModalityCount;
constexpr std::array<Modality, 3> kMedia{Modality::image, Modality::video, Modality::audio};
// <pad> of the toolkit's SentencePiece models (modalities/tokenizer.h); padded positions are masked anyway.
constexpr int64_t kTextPadId = 3;

size_t idx(Modality m) { return static_cast<size_t>(m); }

// The InfoNCE temperature, learned as log(1/t) like CLIP's logit scale and clamped to 1/t <= 100.
struct TemperatureImpl : torch::nn::Module {
  TemperatureImpl(double initial, bool learn) {
    log_scale = register_parameter("log_scale", torch::tensor(std::log(1.0 / initial), torch::kFloat), learn);
  }
  at::Tensor value() const { return log_scale.clamp_max(std::log(100.0)).neg().exp(); }
  at::Tensor log_scale;
};
TORCH_MODULE(Temperature);

// The same sample drops the same media whichever thread, batch composition or resumed process computes it.
double keyed_uniform(uint64_t seed, int64_t epoch, int64_t sample, size_t modality) {
  return longnet::keyed_uniform({seed, static_cast<uint64_t>(epoch), static_cast<uint64_t>(sample), modality});
}

// Drops each present medium of row r with probability `rate` (keyed by samples[r]); a row keeps at least one of its
// media (the one with the largest draw). Modalities left in no row are removed from the input.
void drop_media(fusion::MultimodalInput& input, const std::vector<int64_t>& samples, double rate, uint64_t seed,
                int64_t epoch) {
  if (rate <= 0 || !input.present.defined()) return;
  auto present = input.present.accessor<bool, 2>();
  for (int64_t r = 0; r < input.present.size(0); ++r) {
    int kept = 0, best = -1;
    double best_u = -1;
    for (const Modality m : kMedia) {
      const auto c = static_cast<int64_t>(idx(m));
      if (!present[r][c]) continue;
      const double u = keyed_uniform(seed, epoch, samples[static_cast<size_t>(r)], idx(m));
      if (u > best_u) best_u = u, best = static_cast<int>(c);
      if (u < rate) {
        present[r][c] = false;
      } else {
        ++kept;
      }
    }
    if (kept == 0 && best >= 0) present[r][best] = true;
  }
  for (const Modality m : kMedia) {
    if (input.modalities[idx(m)] && !input.present.select(1, static_cast<int64_t>(idx(m))).any().item<bool>()) {
      input.modalities[idx(m)].reset();
    }
  }
}

// The batch on `device`, presence flags left on the host (fusion/strategies.h). Patches keep their stored type: the
// encoders convert them once, to the autocast or parameter type. A padding mask without any padding is left out:
// attention without a key mask takes the faster kernels.
fusion::MultimodalInput to_device(const fusion::MultimodalInput& in, c10::Device device) {
  fusion::MultimodalInput out;
  for (size_t m = 0; m < kM; ++m) {
    if (!in.modalities[m]) continue;
    const auto& x = *in.modalities[m];
    const auto data = x.data.to(device, /*non_blocking=*/true);
    const bool padded = x.padding.defined() && x.padding.any().item<bool>();
    out.modalities[m] = fusion::ModalityInput{
        .data = data,
        .positions = x.positions.defined() ? x.positions.to(device, true) : at::Tensor(),
        .padding = padded ? x.padding.to(device, true) : at::Tensor()};
  }
  out.present = in.present;
  return out;
}

// The rows of a batch where a host flag (B) is set: found on the host, and on the device for indexing the batch.
struct Rows {
  at::Tensor host, device;
};

Rows rows_where(const at::Tensor& flags, c10::Device device) {
  at::Tensor host = flags.nonzero().squeeze(1);
  return {host, to_device_async(host, device)};
}

// The rows `rows` of `in`, with only the modalities in `keep`.
fusion::MultimodalInput select(const fusion::MultimodalInput& in, const Rows& rows, const std::vector<Modality>& keep) {
  fusion::MultimodalInput out;
  out.present = torch::zeros({rows.host.size(0), static_cast<int64_t>(kM)}, in.present.options());
  for (const Modality m : keep) {
    if (!in.modalities[idx(m)]) continue;
    const auto& x = *in.modalities[idx(m)];
    // take_rows: every row (the flags' nonzero() lists them in order) takes the tensors as they are, not copies.
    const auto take = [&](const at::Tensor& t) { return t.defined() ? fusion::take_rows(t, rows.device) : t; };
    out.modalities[idx(m)] =
        fusion::ModalityInput{.data = take(x.data), .positions = take(x.positions), .padding = take(x.padding)};
    const auto c = static_cast<int64_t>(idx(m));
    out.present.select(1, c).copy_(in.present.select(1, c).index_select(0, rows.host));
  }
  for (const Modality m : keep) {  // a modality no selected row has is left out
    const auto c = static_cast<int64_t>(idx(m));
    if (out.modalities[idx(m)] && !out.present.select(1, c).any().item<bool>()) out.modalities[idx(m)].reset();
  }
  return out;
}

// What the two passes over a batch give, scattered back to the batch's rows.
struct Passes {
  std::array<at::Tensor, kM> embeddings;  // (B, E) or undefined
  at::Tensor present;                     // (B, M) bool, on the host
  at::Tensor media;                       // (B, E) or undefined
  at::Tensor media_present;               // (B) bool, on the host
  at::Tensor lm_logits, text_ids, text_padding;  // the text rows only
};

at::Tensor scatter_rows(const at::Tensor& x, const at::Tensor& rows, int64_t batch) {
  return x.new_zeros({batch, x.size(1)}).index_copy(0, rows, x);
}

// The two passes over a batch already on `device` (to_device of a host batch whose ranges were checked). Taken by
// value, so that the caller's copy is freed once the passes return (autograd keeps what it needs), not held through
// the backward.
Passes run_passes_on_device(fusion::MultimodalModel& model, fusion::MultimodalInput in, c10::Device device) {
  Passes p;
  const int64_t B = in.present.size(0);
  p.present = in.present;
  const auto text_col = in.present.select(1, static_cast<int64_t>(idx(Modality::text)));
  if (in.modalities[idx(Modality::text)] && text_col.any().item<bool>()) {
    const auto rows = rows_where(text_col, device);
    const auto sub = select(in, rows, {Modality::text});
    const auto out = model->forward(sub);
    p.embeddings[idx(Modality::text)] = scatter_rows(out.embeddings[idx(Modality::text)], rows.device, B);
    p.lm_logits = out.lm_logits;
    p.text_ids = sub.modalities[idx(Modality::text)]->data;
    p.text_padding = sub.modalities[idx(Modality::text)]->padding;
  }
  auto media_cols = torch::zeros({B}, in.present.options());
  for (const Modality m : kMedia) {
    if (in.modalities[idx(m)]) media_cols |= in.present.select(1, static_cast<int64_t>(idx(m)));
  }
  p.media_present = media_cols;
  if (media_cols.any().item<bool>()) {
    const auto rows = rows_where(media_cols, device);
    const auto out = model->forward(select(in, rows, {kMedia.begin(), kMedia.end()}));
    for (const Modality m : kMedia) {
      if (out.embeddings[idx(m)].defined()) {
        p.embeddings[idx(m)] = scatter_rows(out.embeddings[idx(m)], rows.device, B);
      }
    }
    p.media = scatter_rows(out.joint, rows.device, B);
  }
  return p;
}

// The two passes over a batch from the loader (on the host), run on `device`.
Passes run_passes(fusion::MultimodalModel& model, const fusion::MultimodalInput& batch, c10::Device device) {
  if (!device.is_cpu()) model->check_ranges(batch);  // on the host: on the device the check would wait for it
  return run_passes_on_device(model, to_device(batch, device), device);
}

// Next-token loss of the captions, padding ignored.
at::Tensor caption_lm_loss(const Passes& p) {
  const int64_t L = p.text_ids.size(1);
  auto targets = p.text_ids.narrow(1, 1, L - 1).clone();
  if (p.text_padding.defined()) targets.masked_fill_(p.text_padding.narrow(1, 1, L - 1), -100);
  const auto logits = p.lm_logits.narrow(1, 0, L - 1);
  return torch::nn::functional::cross_entropy(
      logits.reshape({-1, logits.size(-1)}).to(torch::kFloat), targets.reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
}

struct Losses {
  at::Tensor total;
  std::map<std::string, at::Tensor> parts;  // unweighted, detached (read at log time: no synchronisation per step)
  std::map<std::string, double> weights;
};

// The weighted objectives of one batch. With data-parallel ranks (`group` of several), the contrastive losses run over
// the global batch: embeddings and masks are gathered from every rank (distributed::gather_rows), every rank computes
// the same loss, and the model's gradients are summed over ranks; the caption LM loss stays per rank and is divided
// by the number of ranks, so the sum averages it. Every enabled medium then has an embedding on every rank (zeros
// where the local batch lacks it), so that all ranks make the same collective calls.
Losses compute_losses(const Passes& p, const ExperimentConfig& c, const at::Tensor& temperature,
                      const distributed::ProcessGroup& group) {
  const auto& o = c.objectives;
  const bool ranks = group.valid() && group.size() > 1;
  const int64_t B = p.present.size(0), E = c.multimodal.fusion.embed_dim;
  auto filled = [&](const at::Tensor& e, bool enabled) {
    if (e.defined() || !ranks || !enabled) return e;
    return torch::zeros({B, E}, temperature.options().dtype(torch::kFloat));  // on the model's device
  };
  auto gather = [&](const at::Tensor& t) { return distributed::gather_rows(t, group); };  // t itself in one process
  Losses l;
  auto add = [&](const std::string& name, double weight, const at::Tensor& loss, double scale = 1.0) {
    l.parts[name] = loss.detach();
    l.weights[name] = weight;
    const auto weighted = loss * (weight * scale);
    l.total = l.total.defined() ? l.total + weighted : weighted;
  };
  const auto text = filled(p.embeddings[idx(Modality::text)], c.multimodal[Modality::text].enabled);
  if (text.defined()) {
    // The masks stay on the host (fusion/losses.h). With several ranks the flags travel once, through the group's
    // device (NCCL needs it), and come back: the one wait a step has for them.
    const auto media_present = p.media.defined() ? p.media_present : torch::zeros({B}, p.present.options());
    auto flags = torch::cat({p.present, media_present.unsqueeze(1)}, 1);  // (B, M + 1)
    if (ranks) flags = gather(to_device_async(flags, temperature.device())).cpu();
    const auto has_text = flags.select(1, static_cast<int64_t>(idx(Modality::text)));
    const auto all_text = gather(text.to(torch::kFloat));
    const std::pair<Modality, double> pairs[] = {
        {Modality::video, o.video_text}, {Modality::audio, o.audio_text}, {Modality::image, o.image_text}};
    for (const auto& [m, weight] : pairs) {
      const auto emb = filled(p.embeddings[idx(m)], c.multimodal[m].enabled);
      if (weight <= 0 || !emb.defined()) continue;
      const auto both = has_text & flags.select(1, static_cast<int64_t>(idx(m)));
      add(modalities::to_string(m) + "_text", weight,
          fusion::info_nce(gather(emb.to(torch::kFloat)), all_text, temperature, both));
    }
    const bool any_media = c.multimodal[Modality::image].enabled || c.multimodal[Modality::video].enabled ||
                           c.multimodal[Modality::audio].enabled;
    const auto media = filled(p.media, any_media);
    if (o.media_text > 0 && media.defined()) {
      add("media_text", o.media_text,
          fusion::info_nce(gather(media.to(torch::kFloat)), all_text, temperature,
                           has_text & flags.select(1, static_cast<int64_t>(kM))));
    }
    if (o.lm > 0 && p.lm_logits.defined() && p.text_ids.size(1) > 1) {
      add("lm", o.lm, caption_lm_loss(p), ranks ? 1.0 / group.size() : 1.0);
    }
  }
  if (!l.total.defined()) throw DataError("a batch gave no loss (no sample has text and another modality)");
  return l;
}

// Dense bf16 tensor-core peak of the card, for model FLOPs utilisation; 0 when unknown (no MFU is reported).
double peak_flops(c10::Device device) {
  if (!device.is_cuda()) return 0;
  const std::string name = torch::cuda::device_count() > 0 ? at::cuda::getDeviceProperties(device.index())->name : "";
  if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) return 989.4e12;
  if (name.find("A100") != std::string::npos) return 312e12;
  return 0;
}

// Lengths of the modalities of each sample of a batch (non-padding tokens; 0 when absent).
std::vector<std::array<int64_t, kM>> sample_lengths(const fusion::MultimodalInput& in) {
  const int64_t B = in.present.size(0);
  std::vector<std::array<int64_t, kM>> out(static_cast<size_t>(B), std::array<int64_t, kM>{});
  for (size_t m = 0; m < kM; ++m) {
    if (!in.modalities[m]) continue;
    const auto& x = *in.modalities[m];
    const auto n = x.padding.defined() ? (~x.padding).sum(1).cpu()
                                       : torch::full({B}, x.data.size(1), torch::kLong);
    const auto present = in.present.select(1, static_cast<int64_t>(m)).cpu();
    for (int64_t b = 0; b < B; ++b) {
      if (present[b].item<bool>()) out[static_cast<size_t>(b)][m] = n[b].item<int64_t>();
    }
  }
  return out;
}

// Training FLOPs of one sample (forward + backward ≈ 3 × forward), for the two passes of run_passes.
class FlopCounter {
 public:
  explicit FlopCounter(const fusion::MultimodalModel& model) : model_(model) {}
  double training_flops(const std::array<int64_t, kM>& lengths) {
    auto it = cache_.find(lengths);
    if (it != cache_.end()) return it->second;
    double flops = 0;
    std::array<int64_t, kM> text{}, media = lengths;
    text[idx(Modality::text)] = lengths[idx(Modality::text)];
    media[idx(Modality::text)] = 0;
    for (const auto& pass : {text, media}) {
      if (std::all_of(pass.begin(), pass.end(), [](int64_t n) { return n == 0; })) continue;
      for (const auto& c : model_->summary(pass)) flops += c.forward_flops;
    }
    return cache_[lengths] = 3 * flops;
  }

 private:
  const fusion::MultimodalModel& model_;
  std::map<std::array<int64_t, kM>, double> cache_;
};

// Peak memory since the last call: GPU memory allocated by tensors on CUDA (the peak is reset), else the process's
// peak resident set.
double peak_memory_gb(c10::Device device) {
  if (device.is_cuda()) {
    const auto index = device.has_index() ? device.index() : c10::cuda::current_device();
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
    c10::cuda::CUDACachingAllocator::resetPeakStats(index);
    return static_cast<double>(stats.allocated_bytes[0].peak) / 1e9;
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024 / 1e9;  // ru_maxrss is in KiB on Linux
}

std::array<bool, kM> enabled_modalities(const ExperimentConfig& c) {
  std::array<bool, kM> on{};
  for (const Modality m : modalities::kAllModalities) on[idx(m)] = c.multimodal[m].enabled;
  return on;
}

// <shards>/<split> of a prepared dataset (the first source's when `shards` is empty).
fs::path split_dir(const ExperimentConfig& c, const std::string& split, std::string shards = {}) {
  if (shards.empty()) shards = c.data.shards;
  if (shards.empty()) {
    throw ConfigError(c.source.string() + ": data.shards must name the folder of prepared shards for run.task = "
                      "\"multimodal\" (`longnet prepare` writes it from data.manifest)");
  }
  const fs::path dir = fs::path(shards) / split;
  if (!fs::exists(dir / "index.json")) {
    throw DataError("no prepared '" + split + "' split in " + shards + " (" + (dir / "index.json").string() +
                    " is missing); run `longnet prepare " + c.source.string() + "` first");
  }
  return dir;
}

// What `longnet prepare` skipped: above data.max_bad_fraction the shards are refused; otherwise the list goes into the
// run folder (bad_media.jsonl) and the count into the logs. Returns the number of skipped samples.
int64_t check_bad_media(const ExperimentConfig& c, const std::string& shards) {
  const fs::path summary_file = fs::path(shards) / "prepare_summary.json";
  if (!fs::exists(summary_file)) return 0;  // shards from another tool
  std::ifstream in(summary_file);
  const json summary = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!summary.is_object()) throw DataError(summary_file.string() + ": not valid JSON");
  const int64_t samples = summary.value("samples", int64_t{0}), bad = summary.value("skipped_bad", int64_t{0});
  if (samples > 0 && static_cast<double>(bad) > c.data.max_bad_fraction * static_cast<double>(samples)) {
    throw DataError(summary_file.string() + ": " + std::to_string(bad) + " of " + std::to_string(samples) +
                    " samples could not be decoded, more than data.max_bad_fraction = " +
                    std::to_string(c.data.max_bad_fraction) + " allows (the reasons are in " +
                    (fs::path(shards) / "bad_samples.jsonl").string() + ")");
  }
  return bad;
}

// The shards must hold what the model expects: patch sizes and token ids in range.
void check_shards(const ExperimentConfig& c, const ShardReader& reader, const fs::path& dir) {
  for (int64_t i = 0; i < std::min<int64_t>(reader.size(), 64); ++i) {
    for (const auto& f : reader.fields(i)) {
      for (const Modality m : kMedia) {
        if (f.name != modalities::to_string(m) + "_patches" || !c.multimodal[m].enabled) continue;
        if (f.shape.size() != 2 || f.shape[1] != c.multimodal[m].input_dim) {
          throw DataError(dir.string() + ": sample '" + reader.id(i) + "' has " + f.name + " with " +
                          std::to_string(f.shape.size() == 2 ? f.shape[1] : -1) + " values per patch, and modalities." +
                          modalities::to_string(m) + ".patch_dim = " + std::to_string(c.multimodal[m].input_dim) +
                          " (prepared with other [prepare] patch sizes? run `longnet prepare` into a new folder)");
        }
      }
    }
  }
}

void check_text_ids(const fusion::MultimodalInput& in, int64_t vocab, const fs::path& dir) {
  const auto& text = in.modalities[idx(Modality::text)];
  if (!text) return;
  const int64_t top = text->data.max().item<int64_t>();
  if (top >= vocab) {
    throw DataError(dir.string() + ": a caption has token id " + std::to_string(top) + ", and modalities.text.vocab_size = " +
                    std::to_string(vocab) + " (the shards were tokenised with a larger vocabulary)");
  }
}

// Token-id sequences as a text-only batch (padded with kTextPadId, padding masked), for the text pass alone.
fusion::MultimodalInput text_batch(const std::vector<std::vector<int64_t>>& ids) {
  const auto P = static_cast<int64_t>(ids.size());
  int64_t longest = 1;
  for (const auto& p : ids) longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  auto data = torch::full({P, longest}, kTextPadId, torch::kLong);
  auto padding = torch::ones({P, longest}, torch::kBool);
  for (int64_t i = 0; i < P; ++i) {
    const auto len = static_cast<int64_t>(ids[static_cast<size_t>(i)].size());
    data[i].narrow(0, 0, len).copy_(torch::tensor(ids[static_cast<size_t>(i)], torch::kLong));
    padding[i].narrow(0, 0, len).fill_(false);
  }
  fusion::MultimodalInput in;
  in.modalities[idx(Modality::text)] = fusion::ModalityInput{.data = data, .padding = padding};
  in.present = torch::zeros({P, static_cast<int64_t>(kM)}, torch::kBool);
  in.present.select(1, static_cast<int64_t>(idx(Modality::text))).fill_(true);
  return in;
}

struct EvalResult {
  json retrieval = json::object();
  json zero_shot = json::object();
};

EvalResult evaluate(fusion::MultimodalModel& model, const ShardReader& reader, const ExperimentConfig& c,
                    c10::Device device) {
  EmbedOptions options;
  options.batch_size = c.train.batch_size;
  options.max_samples = c.eval.batches * c.train.batch_size;
  options.missing_rate = c.data.missing_rate;
  options.seed = static_cast<uint64_t>(c.run.seed) + 1;
  options.bf16 = c.train.precision == "bf16";
  options.loader_workers = c.data.loader_workers;
  const auto embeddings = embed_split(model, reader, device, options);
  EvalResult r;
  r.retrieval = retrieval_report(embeddings);
  if (!c.eval.zero_shot_classes.empty()) r.zero_shot = zero_shot_report(model, embeddings, c, device);
  return r;
}

std::string retrieval_line(const json& report) {
  std::ostringstream line;
  line.precision(3);
  for (const auto& [pair, r] : report.items()) {
    line << (line.tellp() > 0 ? " | " : "") << pair << " R@1 " << r.at("r1").get<double>() << "% (chance "
         << r.at("chance_r1").get<double>() << "%)";
  }
  return line.str();
}

json flatten_report(const EvalResult& result) {
  json flat = json::object();
  for (const auto& [pair, r] : result.retrieval.items()) {
    for (const char* k : {"r1", "r5", "r10", "median_rank"}) flat[pair + "_" + k] = r.at(k);
  }
  for (const auto& [m, r] : result.zero_shot.items()) {
    for (const char* k : {"top1", "top5"}) flat["zero_shot_" + m + "_" + k] = r.at(k);
  }
  return flat;
}

std::string zero_shot_line(const json& report) {
  std::ostringstream line;
  line.precision(3);
  for (const auto& [m, r] : report.items()) {
    line << " | zero-shot " << m << " top-1 " << r.at("top1").get<double>() << "% (chance "
         << r.at("chance_top1").get<double>() << "%)";
  }
  return line.str();
}

}  // namespace

namespace {

// The video clips of a prepared split: 1 + the video_patches_clip<k> fields of its first video sample.
int64_t video_clips(const ShardReader& reader) {
  for (int64_t i = 0; i < reader.size(); ++i) {
    const auto& fields = reader.fields(i);
    auto has = [&](const std::string& name) {
      return std::any_of(fields.begin(), fields.end(), [&](const ShardField& f) { return f.name == name; });
    };
    if (!has("video_patches")) continue;
    int64_t clips = 1;
    while (has("video_patches_clip" + std::to_string(clips))) ++clips;
    return clips;
  }
  return 1;
}

// The passes of one evaluation batch: the per-medium embeddings see every medium, the media fusion sees what is left
// after the drops (EmbedOptions::missing_rate).
std::pair<Passes, Passes> eval_passes(fusion::MultimodalModel& model, const Batch& batch, c10::Device device,
                                      const EmbedOptions& options) {
  auto input = batch.input;
  const AutocastGuard autocast(options.bf16 && device.is_cuda());
  auto full = run_passes(model, input, device);
  if (options.missing_rate <= 0) return {full, full};
  input.present = input.present.clone();
  drop_media(input, batch.samples, options.missing_rate, options.seed, 0);
  return {full, run_passes(model, input, device)};
}

// A training micro-batch: prepared on the host, then its input on the device.
struct StagedBatch {
  fusion::MultimodalInput host;                      // checked, media dropped
  std::vector<std::array<int64_t, kM>> lengths;      // sample_lengths(host)
  std::optional<fusion::MultimodalInput> on_device;  // to_device(host)
};

// Training batches from the loader, one staged ahead on request. Otherwise a step starts by fetching and preparing
// its batch and queueing the copies on the compute stream, while the GPU idles after the previous step's host sync.
// stage(), called once a backward is queued, takes the next batch, prepares it on the host and, on CUDA, queues its
// copies (and the float conversion) on a side stream; take() makes the current stream wait for them. Elsewhere take()
// copies, as without staging. The batches and their order are the loader's either way; but the loader's position is
// past a staged batch, so a caller saving it stages only where take() comes first.
class BatchStager {
 public:
  // The host-side work on a batch before its copies (checks, drops, lengths); may throw.
  using Prepare = std::function<StagedBatch(Batch&)>;

  BatchStager(Loader& loader, c10::Device device, Prepare prepare)
      : loader_(loader), device_(device), prepare_(std::move(prepare)) {}

  void stage() {
    try {
      staged_ = from_loader();
    } catch (...) {  // met by take(), in the step that would have taken the batch
      error_ = std::current_exception();
      return;
    }
    if (!device_.is_cuda()) return;
    try {
      const auto index = device_.has_index() ? device_.index() : c10::cuda::current_device();
      if (!stream_) stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index);
      const c10::cuda::CUDAStreamGuard guard(*stream_);
      staged_->on_device = to_device(staged_->host, device_);
      ready_.record(*stream_);
    } catch (const std::exception&) {  // out of memory, say: take() copies on the current stream, as without staging
      staged_->on_device.reset();
    }
  }

  // The staged batch, else the next one from the loader, with its input on the device for the current stream.
  StagedBatch take() {
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    StagedBatch batch = staged_ ? std::move(*staged_) : from_loader();
    staged_.reset();
    if (!batch.on_device) {
      batch.on_device = to_device(batch.host, device_);
      return batch;
    }
    const auto stream = c10::cuda::getCurrentCUDAStream(stream_->device_index());
    ready_.block(stream);
    // Made on the side stream, used on this one: the caching allocator must not hand their memory back to the side
    // stream before this stream is done with them.
    for (auto& x : batch.on_device->modalities) {
      if (!x) continue;
      for (const at::Tensor* t : {&x->data, &x->positions, &x->padding}) {
        if (t->defined()) t->record_stream(stream);
      }
    }
    return batch;
  }

 private:
  StagedBatch from_loader() {
    auto batch = loader_.next();  // endless
    return prepare_(*batch);
  }

  Loader& loader_;
  const c10::Device device_;
  const Prepare prepare_;
  std::optional<StagedBatch> staged_;
  std::exception_ptr error_;  // what staging the next batch threw
  std::optional<c10::cuda::CUDAStream> stream_;
  c10::cuda::CUDAEvent ready_;  // the staged copies are done
};

}  // namespace

SplitEmbeddings embed_split(fusion::MultimodalModel& model, const ShardReader& reader, c10::Device device,
                            const EmbedOptions& options) {
  std::vector<int64_t> subset;
  const int64_t n = options.max_samples > 0 ? std::min(options.max_samples, reader.size()) : reader.size();
  for (int64_t i = 0; i < n; ++i) subset.push_back(i);
  LoaderOptions lo;
  lo.batch_size = options.batch_size;
  lo.shuffle = false;
  lo.epochs = 1;
  lo.drop_last = false;
  lo.workers = options.loader_workers;
  lo.pad_id = kTextPadId;
  lo.half_patches = lo.pin_memory = device.is_cuda();
  const auto& mc = model->config();
  for (const Modality m : modalities::kAllModalities) lo.modalities[idx(m)] = mc[m].enabled;
  Loader loader(reader, lo, subset);

  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const int64_t E = mc.fusion.embed_dim;
  SplitEmbeddings out;
  std::vector<at::Tensor> present, media, media_present;
  std::vector<int64_t> labels;
  std::array<std::vector<at::Tensor>, kM> per;
  while (auto batch = loader.next()) {
    out.ids.insert(out.ids.end(), batch->ids.begin(), batch->ids.end());
    for (const int64_t index : batch->samples) {
      const auto& fields = reader.fields(index);
      const bool labelled = std::any_of(fields.begin(), fields.end(), [](const ShardField& f) { return f.name == "label"; });
      labels.push_back(labelled ? reader.read(index, "label").view({-1})[0].item<int64_t>() : -1);
    }
    const auto [full, dropped] = eval_passes(model, *batch, device, options);
    const int64_t B = batch->input.present.size(0);
    present.push_back(batch->input.present);
    for (const Modality m : modalities::kAllModalities) {
      if (!mc[m].enabled) continue;
      const auto& e = full.embeddings[idx(m)];
      per[idx(m)].push_back(e.defined() ? e.to(torch::kFloat).cpu() : torch::zeros({B, E}));
    }
    media.push_back(dropped.media.defined() ? dropped.media.to(torch::kFloat).cpu() : torch::zeros({B, E}));
    media_present.push_back(dropped.media_present.cpu());
  }
  // Every caption: samples with several run them through the text pass; a single caption is the text embedding.
  std::vector<at::Tensor> caption_rows;
  std::vector<int64_t> caption_items;
  {
    std::vector<std::vector<int64_t>> pending_ids;
    std::vector<int64_t> pending_items;
    auto flush = [&] {
      if (pending_ids.empty()) return;
      const AutocastGuard autocast(options.bf16 && device.is_cuda());
      const auto passes = run_passes(model, text_batch(pending_ids), device);
      caption_rows.push_back(passes.embeddings[idx(Modality::text)].to(torch::kFloat).cpu());
      caption_items.insert(caption_items.end(), pending_items.begin(), pending_items.end());
      pending_ids.clear();
      pending_items.clear();
    };
    if (mc[Modality::text].enabled) {
      const auto text_emb = torch::cat(per[idx(Modality::text)]);
      const auto text_present = torch::cat(present).select(1, static_cast<int64_t>(idx(Modality::text)));
      for (int64_t row = 0; row < static_cast<int64_t>(out.ids.size()); ++row) {
        if (!text_present[row].item<bool>()) continue;
        const auto index = *reader.find(out.ids[static_cast<size_t>(row)]);
        const auto& fields = reader.fields(index);
        const bool several = std::any_of(fields.begin(), fields.end(),
                                         [](const ShardField& f) { return f.name == "captions_ids"; });
        if (!several) {
          caption_rows.push_back(text_emb.narrow(0, row, 1));
          caption_items.push_back(row);
          continue;
        }
        const auto all = reader.read(index, "captions_ids").to(torch::kLong);
        const auto offsets = reader.read(index, "captions_offsets").to(torch::kLong);
        for (int64_t k = 0; k + 1 < offsets.size(0); ++k) {
          const int64_t a = offsets[k].item<int64_t>(), b = offsets[k + 1].item<int64_t>();
          const auto piece = all.narrow(0, a, b - a);
          pending_ids.emplace_back(piece.data_ptr<int64_t>(), piece.data_ptr<int64_t>() + piece.numel());
          pending_items.push_back(row);
        }
        if (static_cast<int64_t>(pending_ids.size()) >= options.batch_size) flush();
      }
      flush();
    }
  }
  if (!caption_rows.empty()) {
    out.captions = torch::cat(caption_rows);
    out.caption_items = torch::tensor(caption_items, torch::kLong);
  }
  out.present = torch::cat(present);
  for (const Modality m : modalities::kAllModalities) {
    if (!per[idx(m)].empty()) out.modality[idx(m)] = torch::cat(per[idx(m)]);
  }
  out.media = torch::cat(media);
  out.media_present = torch::cat(media_present);
  // Held-out videos prepared as several clips (prepare.eval_clips): the video and fused media embeddings are the
  // normalised means over the clips, each clip run like the first.
  out.video_clips = mc[Modality::video].enabled ? video_clips(reader) : 1;
  if (out.video_clips > 1) {
    at::Tensor video_sum = out.modality[idx(Modality::video)].clone(), media_sum = out.media.clone();
    for (int64_t clip = 1; clip < out.video_clips; ++clip) {
      LoaderOptions clip_options = lo;
      clip_options.video_clip = clip;
      Loader clip_loader(reader, clip_options, subset);
      std::vector<at::Tensor> video_rows, media_rows;
      while (auto batch = clip_loader.next()) {
        const auto [full, dropped] = eval_passes(model, *batch, device, options);
        const int64_t B = batch->input.present.size(0);
        const auto& v = full.embeddings[idx(Modality::video)];
        video_rows.push_back(v.defined() ? v.to(torch::kFloat).cpu() : torch::zeros({B, E}));
        media_rows.push_back(dropped.media.defined() ? dropped.media.to(torch::kFloat).cpu() : torch::zeros({B, E}));
      }
      video_sum += torch::cat(video_rows);
      media_sum += torch::cat(media_rows);
    }
    namespace F = torch::nn::functional;
    out.modality[idx(Modality::video)] = F::normalize(video_sum, F::NormalizeFuncOptions().dim(1));
    out.media = F::normalize(media_sum, F::NormalizeFuncOptions().dim(1));
  }
  if (was_training) model->train();
  out.labels = torch::tensor(labels, torch::kLong);
  return out;
}

json zero_shot_report(fusion::MultimodalModel& model, const SplitEmbeddings& e, const ExperimentConfig& c,
                      c10::Device device) {
  const fs::path file = fs::path(c.data.shards) / "zero_shot_prompts.json";
  std::ifstream in(file);
  if (!in) throw DataError("zero-shot: " + file.string() + " is missing; run `longnet prepare` with eval.zero_shot_classes set");
  const json prompts = json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!prompts.is_object() || prompts.value("classes", json()) != json(c.eval.zero_shot_classes) ||
      prompts.value("templates", json()) != json(c.eval.zero_shot_templates)) {
    throw DataError("zero-shot: " + file.string() + " was made for other eval.zero_shot_classes or templates; run "
                    "`longnet prepare` again");
  }
  // Every prompt through the text pass, padded into one batch.
  std::vector<std::vector<int64_t>> ids;
  for (const auto& per_class : prompts.at("ids")) {
    for (const auto& prompt : per_class) ids.push_back(prompt.get<std::vector<int64_t>>());
  }
  const auto P = static_cast<int64_t>(ids.size());
  const auto input = text_batch(ids);
  check_text_ids(input, c.multimodal[Modality::text].input_dim, file);
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const auto passes = run_passes(model, input, device);
  if (was_training) model->train();
  const auto C = static_cast<int64_t>(c.eval.zero_shot_classes.size());
  auto classes = passes.embeddings[idx(Modality::text)].to(torch::kFloat).cpu().view({C, P / C, -1}).mean(1);
  classes = classes / classes.norm(2, -1, true).clamp_min(1e-12);

  json report = json::object();
  const auto labelled = e.labels >= 0;
  auto score = [&](const std::string& name, const at::Tensor& emb, const at::Tensor& has) {
    const auto rows = (has & labelled).nonzero().squeeze(1);
    if (rows.size(0) == 0) return;
    const auto logits = emb.index_select(0, rows).matmul(classes.t());
    const auto truth = e.labels.index_select(0, rows).clamp_max(C - 1);
    const int64_t k = std::min<int64_t>(5, C);
    const auto top = std::get<1>(logits.topk(k, 1));
    const auto hit = top.eq(truth.unsqueeze(1));
    const auto n = static_cast<double>(rows.size(0));
    report[name] = {{"top1", 100.0 * hit.select(1, 0).sum().item<double>() / n},
                    {"top5", 100.0 * hit.any(1).sum().item<double>() / n},
                    {"samples", rows.size(0)},
                    {"classes", C},
                    {"chance_top1", 100.0 / static_cast<double>(C)}};
  };
  if (e.media.defined()) score("media", e.media, e.media_present);
  for (const Modality m : kMedia) {
    if (e.modality[idx(m)].defined()) {
      score(modalities::to_string(m), e.modality[idx(m)], e.present.select(1, static_cast<int64_t>(idx(m))));
    }
  }
  return report;
}

json retrieval_report(const SplitEmbeddings& e) {
  json report = json::object();
  const auto N = static_cast<int64_t>(e.ids.size());
  struct Side {
    at::Tensor emb, items;  // rows and the sample each belongs to
  };
  auto rows_of = [&](const at::Tensor& emb, const at::Tensor& has) {
    const auto rows = has.nonzero().squeeze(1);
    return Side{emb.index_select(0, rows), rows};
  };
  auto items_with = [&](const Side& s) {
    return torch::zeros({N}, torch::kBool).index_fill_(0, s.items, true);
  };
  // a → b over the rows of a whose sample also has b, against every row of b; then b → a.
  auto add = [&](const std::string& name_a, const Side& a, const std::string& name_b, const Side& b) {
    const auto has_a = items_with(a), has_b = items_with(b);
    const auto a_q = has_b.index_select(0, a.items).nonzero().squeeze(1);
    const auto b_q = has_a.index_select(0, b.items).nonzero().squeeze(1);
    if (a_q.size(0) < 1 || b_q.size(0) < 1 || has_a.sum().item<int64_t>() < 2 || has_b.sum().item<int64_t>() < 2) {
      return;
    }
    auto one = [&](const std::string& key, const Side& q, const at::Tensor& q_rows, const Side& g) {
      const auto r = retrieval_metrics(q.emb.index_select(0, q_rows), q.items.index_select(0, q_rows), g.emb, g.items);
      report[key] = {{"r1", r.r1}, {"r5", r.r5}, {"r10", r.r10}, {"median_rank", r.median_rank},
                     {"mean_rank", r.mean_rank}, {"queries", r.queries}, {"gallery", r.gallery_items},
                     {"chance_r1", 100.0 / static_cast<double>(r.gallery_items)}, {"protocol", r.protocol}};
      const bool video_side = key.find("video") != std::string::npos || key.find("media") != std::string::npos;
      if (e.video_clips > 1 && video_side) {
        report[key]["protocol"] = r.protocol + "; each video the mean of its " + std::to_string(e.video_clips) +
                                  " clips' embeddings";
        report[key]["video_clips"] = e.video_clips;
      }
    };
    one(name_a + "_to_" + name_b, a, a_q, b);
    one(name_b + "_to_" + name_a, b, b_q, a);
  };
  auto column = [&](Modality m) { return e.present.select(1, static_cast<int64_t>(idx(m))); };
  const auto& text = e.modality[idx(Modality::text)];
  if (text.defined()) {
    // Every caption a row of the text side when they are known, else the one text embedding per sample.
    const Side captions = e.captions.defined() ? Side{e.captions, e.caption_items} : rows_of(text, column(Modality::text));
    for (const Modality m : kMedia) {
      if (e.modality[idx(m)].defined()) {
        add("text", captions, modalities::to_string(m), rows_of(e.modality[idx(m)], column(m)));
      }
    }
    if (e.media.defined()) add("text", captions, "media", rows_of(e.media, e.media_present));
  }
  const auto& video = e.modality[idx(Modality::video)];
  const auto& audio = e.modality[idx(Modality::audio)];
  if (video.defined() && audio.defined()) {
    add("video", rows_of(video, column(Modality::video)), "audio", rows_of(audio, column(Modality::audio)));
  }
  return report;
}

TrainedModel load_trained_model(const fs::path& run_dir, const fs::path& checkpoint, c10::Device device) {
  const fs::path config_file = run_dir / "config.toml";
  if (!fs::exists(config_file)) throw ConfigError("'" + run_dir.string() + "' is not a run folder (no config.toml)");
  TrainedModel t;
  t.config = load_experiment(config_file);
  if (t.config.run.task != "multimodal") {
    throw ConfigError(config_file.string() + ": run.task is \"" + t.config.run.task + "\", not \"multimodal\"");
  }
  t.checkpoint = checkpoint.empty() ? latest_checkpoint(run_dir).value_or(fs::path()) : checkpoint;
  if (t.checkpoint.empty()) throw ConfigError("'" + run_dir.string() + "' has no checkpoint yet");
  t.model = fusion::MultimodalModel(t.config.model, t.config.attention, t.config.multimodal);
  Temperature temperature(t.config.objectives.temperature, t.config.objectives.learn_temperature);
  const auto loaded = load_checkpoint(t.checkpoint, {.model = t.model.ptr().get(), .extras = {temperature.ptr().get()}},
                                      nullptr);
  t.step = loaded.step;
  t.model->to(device);
  t.model->eval();
  return t;
}

fs::path train_multimodal(const ExperimentConfig& c, const RunOptions& options) {
  // A distributed launch (`longnet run --nproc N`, or a launcher's RANK/WORLD_SIZE): data parallelism; each rank
  // takes its slice of every global batch of train.batch_size × ranks samples, rank 0 alone evaluates and writes.
  const auto launch = distributed::launch_env_from_environment();
  const int rank = launch ? launch->rank : 0, world = launch ? launch->world_size : 1;
  if (world > 1 && c.train.skip_oom) {
    throw ConfigError("train.skip_oom works in one process only: ranks would disagree on which steps to skip");
  }
  c10::Device device = choose_device(c.run);
  if (world > 1 && device.is_cuda()) {
    device = c10::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(launch->local_rank %
                                                                     static_cast<int>(torch::cuda::device_count())));
  }
  if (c.train.precision == "bf16" && !device.is_cuda()) {
    throw ConfigError("train.precision = \"bf16\" needs a CUDA device; this run uses the CPU");
  }
  // Data problems surface before anything is written.
  const std::vector<DataSource> sources = training_sources(c.data);
  std::vector<std::unique_ptr<ShardReader>> train_shards;
  std::vector<LoaderSource> loader_sources;
  int64_t train_samples = 0, bad_media = 0;
  std::string train_dirs;  // for messages
  for (const DataSource& source : sources) {
    const fs::path dir = split_dir(c, "train", source.shards);
    train_dirs += (train_dirs.empty() ? "" : " or ") + dir.string();
    train_shards.push_back(std::make_unique<ShardReader>(dir));
    check_shards(c, *train_shards.back(), dir);
    loader_sources.push_back({.reader = train_shards.back().get(), .weight = source.weight, .subset = {}});
    train_samples += train_shards.back()->size();
    bad_media += check_bad_media(c, source.shards);
  }
  const fs::path eval_dir = split_dir(c, c.eval.split);
  const ShardReader eval_shards(eval_dir);
  check_shards(c, eval_shards, eval_dir);

  torch::manual_seed(static_cast<uint64_t>(c.run.seed));
  fusion::MultimodalModel model(c.model, c.attention, c.multimodal);
  Temperature temperature(c.objectives.temperature, c.objectives.learn_temperature);
  model->to(device);
  temperature->to(device);
  auto parameters = model->parameters();
  if (c.objectives.learn_temperature) parameters.push_back(temperature->log_scale);
  auto optimizer = make_adamw(parameters, c.train);
  const CheckpointModules modules{.model = model.ptr().get(), .extras = {temperature.ptr().get()}};

  distributed::ProcessGroups groups;
  std::unique_ptr<distributed::GradientAllReduce> grad_sync;
  if (world > 1) {
    // Rank 0 evaluates while the others wait in the next step's first collective: the timeout covers an evaluation.
    groups = distributed::make_process_groups(*launch, /*sequence_size=*/1, device.type(), std::chrono::minutes(60));
    // Summed, not averaged: the contrastive losses are the global batch's on every rank (compute_losses). The
    // temperature is left out: every rank already has its whole gradient.
    grad_sync = std::make_unique<distributed::GradientAllReduce>(model->parameters(), groups.world,
                                                                 distributed::GradientAllReduceOptions{.divide_by = 1});
  }

  LoaderOptions lo;
  lo.batch_size = c.train.batch_size * world;
  lo.shard_rank = rank;
  lo.shard_count = world;
  lo.seed = static_cast<uint64_t>(c.run.seed);
  lo.bucket_batches = c.data.bucket_batches;
  lo.workers = c.data.loader_workers;
  lo.prefetch = c.data.prefetch;
  lo.pad_id = kTextPadId;
  lo.modalities = enabled_modalities(c);
  lo.half_patches = lo.pin_memory = device.is_cuda();
  lo.sample_captions = true;     // every caption of a sample takes turns, epoch by epoch
  lo.sample_video_clips = true;  // and every clip of its video (prepare.train_clips)
  lo.epoch_samples = c.data.epoch_samples;
  Loader loader(std::move(loader_sources), lo);

  const ResumePoint resumed = resume_point(options.resume, modules, *optimizer);
  const int64_t first_step = resumed.first_step;
  const std::optional<int64_t> resume_step = resumed.log_step;
  if (!resumed.state.is_null()) {
    loader.restore({.epoch = resumed.state.at("loader").at("epoch").get<int64_t>(),
                    .batch = resumed.state.at("loader").at("batch").get<int64_t>()});
  }
  const fs::path run_dir = rank != 0 ? fs::path() : !options.resume.empty() ? options.resume : fresh_run_dir(c.run);
  if (rank == 0) write_file_atomic(run_dir / "config.toml", to_toml(c));
  RunLogger logger(run_dir, resume_step);
  if (bad_media > 0 && rank == 0) {
    std::ostringstream text;
    for (const DataSource& source : sources) {
      std::ifstream in(fs::path(source.shards) / "bad_samples.jsonl", std::ios::binary);
      if (in) text << in.rdbuf();
    }
    write_file_atomic(run_dir / "bad_media.jsonl", text.str());
    log::warn(std::to_string(bad_media) + " samples of the manifest were skipped as bad media by `longnet prepare` "
              "(listed in " + (run_dir / "bad_media.jsonl").string() + ")");
  }
  if (!resume_step) logger.log("data", 0, {{"bad_samples", bad_media}});
  const int64_t params = model->num_parameters();
  log::info("run folder " + run_dir.string() + " | device " + device.str() + " | " + std::to_string(params) +
            " parameters | fusion " + c.multimodal.fusion.strategy + " | " + std::to_string(train_samples) +
            " train samples" + (sources.size() > 1 ? " in " + std::to_string(sources.size()) + " sources" : std::string()) +
            " (" + std::to_string(loader.batches_per_epoch()) + " batches an epoch), " +
            std::to_string(eval_shards.size()) + " " + c.eval.split + " samples" +
            (world > 1 ? " | " + std::to_string(world) + " data-parallel ranks, rank " + std::to_string(rank) +
                             ", global batch " + std::to_string(lo.batch_size)
                       : std::string()));

  const double peak = peak_flops(device);
  FlopCounter flop_counter(model);
  const ProgressLine progress(first_step, c.train.steps);
  EvalResult last_eval;
  std::map<std::string, at::Tensor> window_parts;  // summed over the window's steps
  std::map<std::string, double> last_parts;
  double window_loss = 0, window_flops = 0, window_wait_start = loader.wait_seconds(), last_loss = 0;
  int64_t window_steps = 0, window_samples = 0, window_tokens = 0, total_tokens = 0;
  double total_flops = 0, total_wait = 0, total_train_seconds = 0;  // over the logged training windows
  auto window_start = std::chrono::steady_clock::now();

  StepProfiler profiler(c.train, run_dir, device.is_cuda());
  StepFailures failures(c.train);
  // One device: each step's update is queued without waiting for its loss (DeferredStep); the step is booked (loss,
  // failures, logs) when the next one has been queued, or before anything that reads the books.
  std::optional<DeferredStep> deferred;
  if (!grad_sync && DeferredStep::supported(*optimizer)) deferred.emplace();
  struct Queued {
    int64_t step;
    std::map<std::string, at::Tensor> parts;
  };
  std::optional<Queued> queued;
  double grad_norm = 0;  // the last booked step's
  const auto book_applied = [&](double loss, const std::map<std::string, at::Tensor>& parts) {
    last_loss = loss;
    window_loss += loss;
    ++window_steps;
    for (const auto& [k, v] : parts) window_parts[k] = window_parts[k].defined() ? window_parts[k] + v : v;
  };
  const auto book_queued = [&] {
    if (!queued) return;
    const Queued q = std::move(*queued);
    queued.reset();
    const StepValues read = deferred->collect();
    const double loss = read.loss / static_cast<double>(c.train.grad_accumulation);
    grad_norm = read.grad_norm;
    if (failures.accept(q.step, loss, grad_norm)) book_applied(loss, q.parts);  // else skipped on the device too
  };
  BatchStager stager(loader, device, [&](Batch& batch) {
    check_text_ids(batch.input, c.multimodal[Modality::text].input_dim, train_dirs);
    if (c.data.missing_rate > 0) {
      drop_media(batch.input, batch.samples, c.data.missing_rate, static_cast<uint64_t>(c.run.seed), batch.epoch);
    }
    StagedBatch staged{.host = batch.input, .lengths = sample_lengths(batch.input), .on_device = std::nullopt};
    if (!device.is_cpu()) model->check_ranges(staged.host);  // on the host: on the device the check would wait for it
    return staged;
  });
  for (int64_t step = first_step; step < c.train.steps; ++step) {
    const int64_t done = step + 1;
    const bool last = done == c.train.steps;
    // Whether a checkpoint follows the step (on rank 0; every rank takes batches alike): it saves the loader's
    // position, so no batch may be staged across it.
    const bool saves = (c.train.checkpoint_every > 0 && done % c.train.checkpoint_every == 0) || last;
    profiler.before_step(step);
    const double lr = learning_rate(c.train, step);
    set_learning_rate(*optimizer, lr);
    optimizer->zero_grad();
    at::Tensor step_loss_t;
    std::map<std::string, at::Tensor> step_parts;
    std::map<std::string, double> step_weights;
    int64_t step_tokens = 0;  // this rank's; summed over the ranks below
    double step_loss = std::numeric_limits<double>::quiet_NaN();
    bool apply = false, queued_now = false;
    try {
      for (int64_t micro = 0; micro < c.train.grad_accumulation; ++micro) {
        StagedBatch batch = stager.take();
        for (const auto& lengths : batch.lengths) {
          window_flops += flop_counter.training_flops(lengths);  // this rank's (MFU is per device)
          for (int64_t n : lengths) step_tokens += n;
        }
        window_samples += batch.host.present.size(0) * world;  // ranks take equal slices of each global batch
        Losses losses;
        {
          const AutocastGuard autocast(c.train.precision == "bf16");
          const auto passes = run_passes_on_device(model, std::move(*batch.on_device), device);
          losses = compute_losses(passes, c, temperature->value(), groups.world);
        }
        if (injected_at(options.inject_nonfinite_steps, step)) {
          losses.total = losses.total * std::numeric_limits<double>::quiet_NaN();
        }
        if (injected_at(options.inject_oom_steps, step)) throw_injected_oom(step);
        if (grad_sync && micro + 1 == c.train.grad_accumulation) grad_sync->arm();  // the last backward all-reduces
        (losses.total / static_cast<double>(c.train.grad_accumulation)).backward();
        step_weights = losses.weights;
        step_loss_t = step_loss_t.defined() ? step_loss_t + losses.total.detach() : losses.total.detach();
        for (const auto& [k, v] : losses.parts) {
          auto& sum = step_parts[k];
          sum = sum.defined() ? sum + v / static_cast<double>(c.train.grad_accumulation)
                              : v / static_cast<double>(c.train.grad_accumulation);
        }
        // The next micro-batch, or the next step's first, while the GPU runs this backward (before the host syncs
        // below). Last in the micro-step: whatever the step throws next, the staged batch is taken before the
        // loader's position is saved.
        if (micro + 1 < c.train.grad_accumulation || !saves) stager.stage();
      }
      if (grad_sync) {
        grad_norm = 0;
        step_loss = step_loss_t.item<double>() / static_cast<double>(c.train.grad_accumulation);
        grad_sync->finish();
        // Every rank logs the same loss and takes the same decision: the parts averaged over the ranks (the
        // contrastive ones are the global batch's on each already), weighted; a non-finite loss anywhere shows in
        // the sum.
        std::vector<at::Tensor> values{step_loss_t.reshape({1}).to(torch::kDouble),
                                       torch::full({1}, static_cast<double>(step_tokens), step_loss_t.options().dtype(torch::kDouble))};
        for (const auto& [k, v] : step_parts) values.push_back(v.reshape({1}).to(torch::kDouble));
        auto packed = torch::cat(values);
        groups.world.all_reduce(packed);
        packed = (packed / static_cast<double>(world)).cpu();
        step_tokens = std::llround(packed[1].item<double>() * world);
        double weighted = 0;
        int64_t i = 2;
        for (auto& [k, v] : step_parts) {
          const double average = packed[i++].item<double>();
          v = torch::tensor(average, torch::kDouble);
          weighted += step_weights[k] * average;
        }
        step_loss = std::isfinite(packed[0].item<double>()) ? weighted : packed[0].item<double>();
        if (std::isfinite(step_loss) && c.train.grad_clip > 0) {
          grad_norm = clip_grad_norm(parameters, c.train.grad_clip);
        }
        apply = failures.accept(step, step_loss, grad_norm);
      } else if (deferred) {
        book_queued();  // the previous step: its values are long computed
        queued_now = true;  // the update is queued below, where optimizer->step() runs for the other paths
      } else {
        const StepValues read = read_loss_and_clip(step_loss_t, parameters, c.train.grad_clip);
        step_loss = read.loss / static_cast<double>(c.train.grad_accumulation);
        grad_norm = read.grad_norm;
        apply = failures.accept(step, step_loss, grad_norm);
      }
    } catch (const c10::OutOfMemoryError& e) {
      if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
      book_queued();  // the previous step, if it is still queued, is booked first
      failures.out_of_memory(step, e);
    }
    window_tokens += step_tokens;
    const bool evaluates = rank == 0 && ((c.eval.every > 0 && done % c.eval.every == 0) || last);
    if (queued_now) {  // booked with the next step, or now when the books are read
      deferred->queue(step_loss_t, parameters, c.train.grad_clip, *optimizer);
      queued = Queued{step, std::move(step_parts)};
      if (done % c.train.log_every == 0 || evaluates || saves) book_queued();
    } else if (apply) {
      optimizer->step();
      book_applied(step_loss, step_parts);
    } else {  // a skipped step: its gradients are dropped
      optimizer->zero_grad();
    }
    profiler.after_step(step);

    if (done % c.train.log_every == 0 || last) {
      if (device.is_cuda()) torch::cuda::synchronize();
      const auto now = std::chrono::steady_clock::now();
      const double seconds = std::chrono::duration<double>(now - window_start).count();
      const double wait = loader.wait_seconds() - window_wait_start;
      const auto applied = static_cast<double>(std::max<int64_t>(window_steps, 1));
      json fields = {{"loss", window_loss / applied},
                     {"lr", lr},
                     {"grad_norm", grad_norm},
                     {"temperature", temperature->value().item<double>()},
                     {"samples_per_s", static_cast<double>(window_samples) / seconds},
                     {"tokens_per_s", static_cast<double>(window_tokens) / seconds},
                     {"data_wait_fraction", wait / seconds},
                     {"peak_memory_gb", peak_memory_gb(device)},
                     {"skipped_nonfinite", failures.skipped_nonfinite()},
                     {"skipped_oom", failures.skipped_oom()},
                     {"elapsed_s", progress.elapsed_seconds()}};
      std::map<std::string, double> parts;
      for (const auto& [k, v] : window_parts) parts[k] = v.item<double>() / applied;
      for (const auto& [k, v] : parts) fields["loss_" + k] = v;
      if (peak > 0) fields["mfu"] = window_flops / seconds / peak;
      std::ostringstream line;
      line.precision(4);
      line << "loss " << fields["loss"].get<double>();
      for (const auto& [k, v] : parts) line << " (" << k << " " << v << ")";
      line << " | lr " << lr << " | " << static_cast<int64_t>(fields["samples_per_s"].get<double>() * 10) / 10.0
           << " samples/s | data wait " << static_cast<int>(100 * wait / seconds) << "%";
      if (peak > 0) line << " | MFU " << static_cast<int>(1000 * fields["mfu"].get<double>()) / 10.0 << "%";
      log::info(progress.format(done, line.str()));
      // The first window includes filling the prefetch queue.
      if (wait / seconds > 0.1 && done - c.train.log_every > first_step) {
        log::warn("the data loader is the bottleneck: the step waited for batches " +
                  std::to_string(static_cast<int>(100 * wait / seconds)) + "% of the time; raise data.loader_workers (" +
                  std::to_string(c.data.loader_workers) + ") or data.prefetch (" + std::to_string(c.data.prefetch) +
                  "), or store the shards on faster storage");
      }
      logger.log("train", done, fields);
      last_parts = parts;
      total_tokens += window_tokens;
      total_flops += window_flops;
      total_wait += wait;
      total_train_seconds += seconds;
      window_start = now;
      window_wait_start = loader.wait_seconds();
      window_loss = window_flops = 0;
      window_steps = window_samples = window_tokens = 0;
      window_parts.clear();
    }
    if (evaluates) {
      const auto eval_start = std::chrono::steady_clock::now();
      last_eval = evaluate(model, eval_shards, c, device);
      log::info("step " + std::to_string(done) + " " + c.eval.split + ": " + retrieval_line(last_eval.retrieval) +
                zero_shot_line(last_eval.zero_shot));
      write_file_atomic(run_dir / "retrieval.json",
                        json{{"step", done}, {"split", c.eval.split}, {"shards", eval_dir.string()},
                             {"pairs", last_eval.retrieval}, {"zero_shot", last_eval.zero_shot}}.dump(2) + "\n");
      logger.log(c.eval.split, done, flatten_report(last_eval));
      window_start += std::chrono::steady_clock::now() - eval_start;  // evaluation time is not training throughput
    }
    if (rank == 0 && saves) {
      const auto save_start = std::chrono::steady_clock::now();
      const auto position = loader.state();
      save_checkpoint(run_dir, done, modules, *optimizer,
                      {{"loader", {{"epoch", position.epoch}, {"batch", position.batch}}}}, c.train.keep_checkpoints);
      window_start += std::chrono::steady_clock::now() - save_start;
    }
  }

  const double seconds = progress.elapsed_seconds();
  if (rank != 0) return run_dir;
  json summary = {{"task", "multimodal"},
                  {"fusion", c.multimodal.fusion.strategy},
                  {"missing_rate", c.data.missing_rate},
                  {"seed", c.run.seed},
                  {"steps", c.train.steps},
                  {"parameters", params},
                  {"train_seconds", seconds},
                  {"final_train_loss", last_loss},
                  {"final_train_losses", last_parts},
                  {"eval_split", c.eval.split},
                  {"retrieval", last_eval.retrieval},
                  {"zero_shot", last_eval.zero_shot},
                  {"data_wait_fraction", total_wait / std::max(total_train_seconds, 1e-9)},
                  {"tokens_per_s", static_cast<double>(total_tokens) / std::max(total_train_seconds, 1e-9)},
                  {"device", device.str()},
                  {"data_parallel_ranks", world},
                  {"skipped_nonfinite_steps", failures.skipped_nonfinite()},
                  {"skipped_oom_steps", failures.skipped_oom()}};
  // Throughput figures count training steps only (evaluation and checkpoints excluded).
  if (peak > 0) summary["mfu"] = total_flops / std::max(total_train_seconds, 1e-9) / peak;
  if (resume_step) summary["resumed_from_step"] = first_step;
  write_file_atomic(run_dir / "summary.json", summary.dump(2) + "\n");
  log::info("done in " + format_duration(seconds) + ": " + retrieval_line(last_eval.retrieval) +
            zero_shot_line(last_eval.zero_shot));
  log::info("wrote " + (run_dir / "summary.json").string());
  return run_dir;
}

}  // namespace longnet::pipelines
