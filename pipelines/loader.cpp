#include "pipelines/loader.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <utility>

#include <torch/torch.h>

#include "core/error.h"
#include "core/keyed_random.h"

namespace longnet::pipelines {
namespace {

using modalities::Modality;

std::string field_of(Modality m) { return m == Modality::text ? "text_ids" : modalities::to_string(m) + "_patches"; }

// Fisher–Yates with the engine's raw output, so that the order depends on the seed only (std::shuffle's algorithm
// is the standard library's choice).
template <typename T>
void shuffle(std::vector<T>& v, std::mt19937_64& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng() % i]);
}

const ShardField* find_field(const std::vector<ShardField>& fields, const std::string& name) {
  for (const auto& f : fields) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

// The collation below converts with plain loops, not torch operators: a worker thread that runs torch's parallel
// operators on a batch's millions of elements starts an OpenMP team of its own, one per worker, and those teams
// compete with the training thread for the cores (its kernel launches then stall as the data wait does).

// Patch values of a byte: x / 127.5 - 1 as float32 and float16, computed once by the torch operators that define
// them (so the tables hold exactly what converting a uint8 tensor gives).
struct ByteTables {
  std::array<float, 256> f32{};
  std::array<at::Half, 256> f16{};
};
const ByteTables& byte_tables() {
  static const ByteTables tables = [] {
    ByteTables t;
    const at::Tensor values = torch::arange(256, torch::kInt).to(torch::kByte).to(torch::kFloat) / 127.5 - 1.0;
    const at::Tensor halves = values.to(torch::kHalf);
    std::copy_n(values.data_ptr<float>(), 256, t.f32.begin());
    std::copy_n(halves.data_ptr<at::Half>(), 256, t.f16.begin());
    return t;
  }();
  return tables;
}

// A contiguous (n, dim) patch tensor into n·dim float16 or float32 values at dst: uint8 maps to x/127.5 - 1.
void convert_patches(const at::Tensor& patches, void* dst, bool half) {
  const at::Tensor src = patches.is_contiguous() ? patches : patches.contiguous();
  const auto count = static_cast<size_t>(src.numel());
  switch (src.scalar_type()) {
    case torch::kByte: {
      const uint8_t* in = src.data_ptr<uint8_t>();
      const ByteTables& t = byte_tables();
      if (half) {
        auto* out = static_cast<at::Half*>(dst);
        for (size_t i = 0; i < count; ++i) out[i] = t.f16[in[i]];
      } else {
        auto* out = static_cast<float*>(dst);
        for (size_t i = 0; i < count; ++i) out[i] = t.f32[in[i]];
      }
      return;
    }
    case torch::kHalf: {
      const at::Half* in = src.data_ptr<at::Half>();
      if (half) {
        std::memcpy(dst, in, count * sizeof(at::Half));
      } else {
        std::transform(in, in + count, static_cast<float*>(dst), [](at::Half h) { return static_cast<float>(h); });
      }
      return;
    }
    case torch::kFloat: {
      const float* in = src.data_ptr<float>();
      if (half) {
        std::transform(in, in + count, static_cast<at::Half*>(dst), [](float f) { return at::Half(f); });
      } else {
        std::memcpy(dst, in, count * sizeof(float));
      }
      return;
    }
    default:  // other stored types (not written by `longnet prepare`): through float32
      convert_patches(src.to(torch::kFloat), dst, half);
  }
}

// Integer ids or positions (int16, int32 or int64; other types are converted by torch) into int64 at dst.
void copy_integers(const at::Tensor& values, int64_t* dst) {
  const at::Tensor src = values.is_contiguous() ? values : values.contiguous();
  const auto count = static_cast<size_t>(src.numel());
  switch (src.scalar_type()) {
    case torch::kShort: std::copy_n(src.data_ptr<int16_t>(), count, dst); return;
    case torch::kInt: std::copy_n(src.data_ptr<int32_t>(), count, dst); return;
    case torch::kLong: std::copy_n(src.data_ptr<int64_t>(), count, dst); return;
    default: copy_integers(src.to(torch::kLong), dst);
  }
}

}  // namespace

Loader::Loader(const ShardReader& reader, LoaderOptions options, std::vector<int64_t> subset)
    : Loader(std::vector<LoaderSource>{{&reader, 1.0, std::move(subset)}}, std::move(options)) {}

Loader::Loader(std::vector<LoaderSource> sources, LoaderOptions options)
    : sources_(std::move(sources)), options_(std::move(options)) {
  if (options_.batch_size < 1) throw ConfigError("loader: batch_size must be >= 1");
  if (options_.workers < 1) throw ConfigError("loader: workers must be >= 1");
  if (options_.prefetch < 1) throw ConfigError("loader: prefetch must be >= 1");
  if (options_.epochs < 0 || options_.bucket_batches < 0 || options_.epoch_samples < 0) {
    throw ConfigError("loader: epochs, bucket_batches and epoch_samples must be >= 0");
  }
  if (sources_.empty()) throw ConfigError("loader: no sources");
  if (options_.shard_count < 1 || options_.shard_rank < 0 || options_.shard_rank >= options_.shard_count ||
      options_.batch_size % options_.shard_count != 0) {
    throw ConfigError("loader: shard_rank must be in [0, shard_count) and shard_count must divide batch_size");
  }
  mixing_ = sources_.size() > 1 || options_.epoch_samples > 0;
  double total_weight = 0;
  for (size_t s = 0; s < sources_.size(); ++s) {
    LoaderSource& source = sources_[s];
    if (source.reader == nullptr) throw ConfigError("loader: source " + std::to_string(s) + " has no reader");
    if (!(source.weight > 0 && std::isfinite(source.weight))) {
      throw ConfigError("loader: source " + std::to_string(s) + " needs a positive weight");
    }
    total_weight += source.weight;
    offsets_.push_back(offsets_.empty() ? 0 : offsets_.back() + sources_[s - 1].reader->size());
    const ShardReader& reader = *source.reader;
    if (source.subset.empty()) {
      source.subset.resize(static_cast<size_t>(reader.size()));
      std::iota(source.subset.begin(), source.subset.end(), int64_t{0});
    }
    source_positions_.emplace_back();
    // Samples that hold none of the wanted modalities cannot form an input; they are left out here, once.
    for (const int64_t index : source.subset) {
      if (index < 0 || index >= reader.size()) {
        throw ConfigError("loader: sample index " + std::to_string(index) + " outside the " +
                          std::to_string(reader.size()) + " prepared samples");
      }
      int64_t length = 0;
      bool any = false;
      for (const Modality m : modalities::kAllModalities) {
        if (!options_.modalities[static_cast<size_t>(m)]) continue;
        if (const ShardField* f = find_field(reader.fields(index), field_of(m)); f != nullptr && !f->shape.empty()) {
          any = true;
          length += f->shape[0];
        }
      }
      if (any) {
        source_positions_.back().push_back(static_cast<int64_t>(subset_.size()));
        subset_.push_back(offsets_[s] + index);
        lengths_.push_back(length);
      }
    }
    if (mixing_ && source_positions_.back().empty()) {
      throw DataError("loader: source " + std::to_string(s) + " has no usable samples");
    }
  }
  double running = 0;
  for (const LoaderSource& source : sources_) cumulative_.push_back(running += source.weight / total_weight);
  const int64_t n = epoch_samples_ =
      options_.epoch_samples > 0 ? options_.epoch_samples : static_cast<int64_t>(subset_.size());
  batches_per_epoch_ = options_.drop_last ? n / options_.batch_size : (n + options_.batch_size - 1) / options_.batch_size;
  if (batches_per_epoch_ == 0) {
    throw DataError("loader: " + std::to_string(n) + " samples per epoch cannot fill a batch of " +
                    std::to_string(options_.batch_size));
  }
  start();
}

Loader::~Loader() { stop(); }

std::vector<int64_t> Loader::epoch_order(int64_t epoch) const {
  {
    const std::lock_guard lock(mutex_);
    if (auto it = order_cache_.find(epoch); it != order_cache_.end()) return it->second;
  }
  std::seed_seq seq{static_cast<uint32_t>(options_.seed), static_cast<uint32_t>(options_.seed >> 32),
                    static_cast<uint32_t>(epoch)};
  std::mt19937_64 rng(seq);
  std::vector<int64_t> order;  // positions into subset_
  if (mixing_) {
    order = mixed_order(epoch);
  } else {
    order.resize(subset_.size());
    std::iota(order.begin(), order.end(), int64_t{0});
    if (options_.shuffle) shuffle(order, rng);
  }
  if (options_.bucket_batches > 0) {
    const auto window = static_cast<size_t>(options_.bucket_batches * options_.batch_size);
    const auto bs = static_cast<size_t>(options_.batch_size);
    std::vector<int64_t> bucketed;
    bucketed.reserve(order.size());
    for (size_t begin = 0; begin < order.size(); begin += window) {
      const size_t end = std::min(order.size(), begin + window);
      std::stable_sort(order.begin() + static_cast<std::ptrdiff_t>(begin),
                       order.begin() + static_cast<std::ptrdiff_t>(end),
                       [this](int64_t a, int64_t b) { return lengths_[a] < lengths_[b]; });
      std::vector<size_t> starts;
      for (size_t s = begin; s < end; s += bs) starts.push_back(s);
      if (options_.shuffle) shuffle(starts, rng);
      for (const size_t s : starts) {
        for (size_t i = s; i < std::min(end, s + bs); ++i) bucketed.push_back(order[i]);
      }
    }
    order = std::move(bucketed);
  }
  for (auto& position : order) position = subset_[static_cast<size_t>(position)];
  const std::lock_guard lock(mutex_);
  if (order_cache_.size() > 4) order_cache_.erase(order_cache_.begin());  // workers only look one epoch ahead
  return order_cache_.emplace(epoch, std::move(order)).first->second;
}

std::vector<int64_t> Loader::mixed_order(int64_t epoch) const {
  const int64_t per_epoch = epoch_samples_;
  const size_t sources = sources_.size();
  auto pick = [&](int64_t draw) {
    const double u = keyed_uniform({options_.seed, static_cast<uint64_t>(draw), 0x6d6978ULL});
    const auto it = std::upper_bound(cumulative_.begin(), cumulative_.end(), u);
    return std::min(static_cast<size_t>(it - cumulative_.begin()), sources - 1);
  };
  // Draws per source before this epoch: replayed from the latest epoch already known (draws are keyed, so this is
  // cheap counting).
  std::vector<int64_t> drawn(sources, 0);
  int64_t from = 0;
  {
    const std::lock_guard lock(mutex_);
    if (auto it = draws_before_.upper_bound(epoch); it != draws_before_.begin()) {
      --it;
      from = it->first;
      drawn = it->second;
    }
  }
  for (int64_t g = from * per_epoch; g < epoch * per_epoch; ++g) ++drawn[pick(g)];
  {
    const std::lock_guard lock(mutex_);
    draws_before_[epoch] = drawn;
  }
  std::map<std::pair<size_t, int64_t>, std::vector<int64_t>> passes;  // (source, pass) -> permutation
  auto permutation = [&](size_t s, int64_t pass) -> const std::vector<int64_t>& {
    auto [it, added] = passes.try_emplace({s, pass});
    if (added) {
      it->second = source_positions_[s];
      if (options_.shuffle) {
        std::seed_seq seq{static_cast<uint32_t>(options_.seed), static_cast<uint32_t>(options_.seed >> 32),
                          static_cast<uint32_t>(s), static_cast<uint32_t>(pass), 0x70617373U};
        std::mt19937_64 rng(seq);
        shuffle(it->second, rng);
      }
    }
    return it->second;
  };
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(per_epoch));
  for (int64_t g = epoch * per_epoch; g < (epoch + 1) * per_epoch; ++g) {
    const size_t s = pick(g);
    const auto n = static_cast<int64_t>(source_positions_[s].size());
    const int64_t k = drawn[s]++;
    order.push_back(permutation(s, k / n)[static_cast<size_t>(k % n)]);
  }
  return order;
}

std::pair<const ShardReader*, int64_t> Loader::locate(int64_t sample) const {
  const auto it = std::upper_bound(offsets_.begin(), offsets_.end(), sample);
  const auto s = static_cast<size_t>(it - offsets_.begin()) - 1;
  return {sources_[s].reader, sample - offsets_[s]};
}

std::vector<int64_t> Loader::batch_samples(int64_t epoch, int64_t index) const {
  const auto order = epoch_order(epoch);
  const auto begin = static_cast<size_t>(index * options_.batch_size);
  const size_t end = std::min(order.size(), begin + static_cast<size_t>(options_.batch_size));
  std::vector<int64_t> batch(order.begin() + static_cast<std::ptrdiff_t>(begin),
                             order.begin() + static_cast<std::ptrdiff_t>(end));
  if (options_.shard_count == 1) return batch;
  const auto part = static_cast<size_t>(options_.batch_size / options_.shard_count);
  const size_t from = std::min(batch.size(), static_cast<size_t>(options_.shard_rank) * part);
  const size_t to = std::min(batch.size(), from + part);
  return {batch.begin() + static_cast<std::ptrdiff_t>(from), batch.begin() + static_cast<std::ptrdiff_t>(to)};
}

Batch Loader::collate(const std::vector<int64_t>& samples, int64_t epoch) const {
  Batch batch;
  batch.samples = samples;
  const auto B = static_cast<int64_t>(samples.size());
  std::vector<std::map<std::string, at::Tensor>> fields;
  fields.reserve(samples.size());
  for (const int64_t s : samples) {
    const auto [reader, local] = locate(s);
    batch.ids.push_back(reader->id(local));
    fields.push_back(read_sample(*reader, local, s, epoch));
  }
  auto present = torch::zeros({B, modalities::kModalityCount}, torch::kBool);
  for (const Modality m : modalities::kAllModalities) {
    const auto mi = static_cast<size_t>(m);
    if (!options_.modalities[mi]) continue;
    const std::string name = field_of(m);
    const int64_t limit = options_.max_tokens[mi];
    int64_t longest = 0, dim = -1;
    for (size_t b = 0; b < samples.size(); ++b) {
      auto it = fields[b].find(name);
      if (it == fields[b].end()) continue;
      const at::Tensor& t = it->second;
      const bool ok = m == Modality::text ? t.dim() == 1 : t.dim() == 2;
      if (!ok) {
        throw DataError("sample '" + batch.ids[b] + "': field " + name + " has " + std::to_string(t.dim()) +
                        " dimensions, expected " + (m == Modality::text ? "1 (L)" : "2 (N, dim)"));
      }
      if (m != Modality::text) {
        if (dim >= 0 && t.size(1) != dim) {
          throw DataError("sample '" + batch.ids[b] + "': " + name + " has patch size " + std::to_string(t.size(1)) +
                          ", other samples " + std::to_string(dim) + " (prepare them with the same settings)");
        }
        dim = t.size(1);
      }
      longest = std::max(longest, limit > 0 ? std::min(limit, t.size(0)) : t.size(0));
    }
    if (longest == 0) continue;  // no sample of the batch has it
    // Pinned host memory lets the copies to the GPU run asynchronously (the allocation is the worker's, not the
    // training loop's): a copy from pageable memory waits for the work queued before it. float16 halves the bytes
    // the patches' copy moves.
    const auto host = torch::TensorOptions().pinned_memory(options_.pin_memory);
    const bool text = m == Modality::text;
    const int64_t width = text ? 1 : dim;
    fusion::ModalityInput in;
    // Every element is written below (values, then zeros or pad ids past each sample's length), so no fill first.
    in.padding = torch::empty({B, longest}, host.dtype(torch::kBool));
    in.data = text ? torch::empty({B, longest}, host.dtype(torch::kLong))
                   : torch::empty({B, longest, dim}, host.dtype(options_.half_patches ? torch::kHalf : torch::kFloat));
    if (!text) in.positions = torch::empty({B, longest, 3}, host.dtype(torch::kLong));
    const auto data_row_bytes = static_cast<size_t>(longest * width) * in.data.element_size();
    for (size_t b = 0; b < samples.size(); ++b) {
      const auto row = static_cast<int64_t>(b);
      auto* data = static_cast<char*>(in.data.data_ptr()) + b * data_row_bytes;
      auto* padding = in.padding.data_ptr<bool>() + row * longest;
      auto* positions = text ? nullptr : in.positions.data_ptr<int64_t>() + row * longest * 3;
      auto it = fields[b].find(name);
      const int64_t n = it == fields[b].end() ? 0 : std::min(longest, it->second.size(0));
      std::fill(padding, padding + n, false);
      std::fill(padding + n, padding + longest, true);
      if (text) {
        auto* ids = reinterpret_cast<int64_t*>(data);
        if (n > 0) copy_integers(it->second.narrow(0, 0, n), ids);
        std::fill(ids + n, ids + longest, options_.pad_id);
      } else {
        const size_t filled = static_cast<size_t>(n * dim) * in.data.element_size();
        if (n > 0) convert_patches(it->second.narrow(0, 0, n), data, options_.half_patches);
        std::memset(data + filled, 0, data_row_bytes - filled);
        if (n > 0) {
          auto pos = fields[b].find(modalities::to_string(m) + "_positions");
          if (pos == fields[b].end() || pos->second.dim() != 2 || pos->second.size(1) != 3 ||
              pos->second.size(0) != it->second.size(0)) {
            throw DataError("sample '" + batch.ids[b] + "': " + name + " needs " + modalities::to_string(m) +
                            "_positions of shape (" + std::to_string(it->second.size(0)) + ", 3)");
          }
          copy_integers(pos->second.narrow(0, 0, n), positions);
        }
        std::fill(positions + n * 3, positions + longest * 3, int64_t{0});
      }
      if (n > 0) present[row][static_cast<int64_t>(mi)] = true;
    }
    batch.input.modalities[mi] = std::move(in);
  }
  batch.input.present = present;
  return batch;
}

std::map<std::string, at::Tensor> Loader::read_sample(const ShardReader& reader, int64_t local, int64_t sample,
                                                      int64_t epoch) const {
  // Only the fields the batch uses are read: a sample may also hold extra clips and captions.
  const std::vector<ShardField>& stored = reader.fields(local);
  const auto has = [&](const std::string& name) { return find_field(stored, name) != nullptr; };
  std::map<std::string, at::Tensor> out;
  const auto take = [&](const std::string& as, const std::string& field) {
    if (has(field)) out[as] = reader.read(local, field);
  };
  const auto& on = options_.modalities;
  if (on[static_cast<size_t>(Modality::text)]) {
    bool picked = false;
    if (options_.sample_captions && has("captions_ids") && has("captions_offsets")) {
      const auto offsets = reader.read(local, "captions_offsets").to(torch::kLong);
      const int64_t count = offsets.size(0) - 1;
      if (count > 0) {
        std::seed_seq seq{static_cast<uint32_t>(options_.seed), static_cast<uint32_t>(options_.seed >> 32),
                          static_cast<uint32_t>(epoch), static_cast<uint32_t>(sample), 0x63617074U};
        std::mt19937 pick(seq);
        const int64_t k = std::uniform_int_distribution<int64_t>(0, count - 1)(pick);
        const int64_t a = offsets[k].item<int64_t>(), b = offsets[k + 1].item<int64_t>();
        out["text_ids"] = reader.read(local, "captions_ids").narrow(0, a, b - a);
        picked = true;
      }
    }
    if (!picked) take("text_ids", "text_ids");
  }
  for (const Modality m : modalities::kAllModalities) {
    if (m == Modality::text || !on[static_cast<size_t>(m)]) continue;
    const std::string patches = modalities::to_string(m) + "_patches";
    const std::string positions = modalities::to_string(m) + "_positions";
    std::string suffix;
    if (m == Modality::video && has(patches)) {
      int64_t clip = options_.video_clip;
      if (clip == 0 && options_.sample_video_clips && has("video_patches_clip1")) {
        int64_t clips = 2;
        while (has("video_patches_clip" + std::to_string(clips))) ++clips;
        clip = static_cast<int64_t>(keyed_hash({options_.seed, static_cast<uint64_t>(epoch),
                                                static_cast<uint64_t>(sample), 0x636c6970ULL}) %
                                    static_cast<uint64_t>(clips));
      }
      if (clip > 0) {
        suffix = "_clip" + std::to_string(clip);
        if (!has(patches + suffix) || !has(positions + suffix)) {
          throw DataError("sample '" + reader.id(local) + "' has no video clip " + std::to_string(clip) +
                          " (prepared with fewer prepare.eval_clips?)");
        }
      }
    }
    take(patches, patches + suffix);
    take(positions, positions + suffix);
  }
  return out;
}

void Loader::start() {
  stopping_ = false;
  for (int64_t i = 0; i < options_.workers; ++i) threads_.emplace_back([this] { work(); });
}

void Loader::stop() {
  {
    const std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  space_cv_.notify_all();
  ready_cv_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
}

void Loader::work() {
  // A worker claims the next batch number when fewer than `prefetch` batches are ahead of the consumer.
  const int64_t total = options_.epochs > 0 ? options_.epochs * batches_per_epoch_ : -1;
  for (;;) {
    int64_t claim;
    {
      std::unique_lock lock(mutex_);
      space_cv_.wait(lock, [&] {
        return stopping_ || error_ || (next_to_claim_ - next_to_deliver_ < options_.prefetch &&
                                       (total < 0 || next_to_claim_ < total));
      });
      if (stopping_ || error_) return;
      claim = next_to_claim_++;
    }
    const int64_t epoch = claim / batches_per_epoch_, index = claim % batches_per_epoch_;
    try {
      Batch batch = collate(batch_samples(epoch, index), epoch);
      batch.epoch = epoch;
      batch.index = index;
      const std::lock_guard lock(mutex_);
      ready_.emplace(claim, std::move(batch));
    } catch (...) {
      const std::lock_guard lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    ready_cv_.notify_all();
  }
}

std::optional<Batch> Loader::next() {
  std::unique_lock lock(mutex_);
  const int64_t wanted = next_to_deliver_;
  if (options_.epochs > 0 && wanted >= options_.epochs * batches_per_epoch_) return std::nullopt;
  const int64_t key = wanted;
  if (ready_.find(key) == ready_.end() && !error_) {
    const auto t0 = std::chrono::steady_clock::now();
    ready_cv_.wait(lock, [&] { return error_ || ready_.find(key) != ready_.end(); });
    wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  if (ready_.find(key) == ready_.end()) std::rethrow_exception(error_);
  Batch batch = std::move(ready_.at(key));
  ready_.erase(key);
  ++next_to_deliver_;
  lock.unlock();
  space_cv_.notify_all();
  return batch;
}

LoaderState Loader::state() const {
  const std::lock_guard lock(mutex_);
  return {next_to_deliver_ / batches_per_epoch_, next_to_deliver_ % batches_per_epoch_};
}

void Loader::restore(const LoaderState& state) {
  if (state.epoch < 0 || state.batch < 0 || state.batch >= batches_per_epoch_) {
    throw DataError("loader: cannot resume at epoch " + std::to_string(state.epoch) + ", batch " +
                    std::to_string(state.batch) + " (an epoch has " + std::to_string(batches_per_epoch_) +
                    " batches; was the data prepared differently?)");
  }
  stop();
  {
    const std::lock_guard lock(mutex_);
    ready_.clear();
    error_ = nullptr;
    next_to_claim_ = next_to_deliver_ = state.epoch * batches_per_epoch_ + state.batch;
  }
  start();
}

}  // namespace longnet::pipelines
