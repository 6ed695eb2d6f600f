#include "pipelines/loader.h"

#include <algorithm>
#include <chrono>
#include <cmath>
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
    fields.push_back(reader->read(local));
    auto& f = fields.back();
    int64_t clip = options_.video_clip;
    if (clip == 0 && options_.sample_video_clips && f.count("video_patches_clip1") != 0) {
      int64_t clips = 2;
      while (f.count("video_patches_clip" + std::to_string(clips)) != 0) ++clips;
      clip = static_cast<int64_t>(keyed_hash({options_.seed, static_cast<uint64_t>(epoch), static_cast<uint64_t>(s),
                                              0x636c6970ULL}) %
                                  static_cast<uint64_t>(clips));
    }
    if (clip > 0 && f.count("video_patches") != 0) {
      const std::string suffix = "_clip" + std::to_string(clip);
      if (f.count("video_patches" + suffix) == 0 || f.count("video_positions" + suffix) == 0) {
        throw DataError("sample '" + batch.ids.back() + "' has no video clip " + std::to_string(clip) +
                        " (prepared with fewer prepare.eval_clips?)");
      }
      f["video_patches"] = f["video_patches" + suffix];
      f["video_positions"] = f["video_positions" + suffix];
    }
    if (options_.sample_captions && f.count("captions_ids") != 0 && f.count("captions_offsets") != 0) {
      const auto offsets = f["captions_offsets"].to(torch::kLong);
      const int64_t count = offsets.size(0) - 1;
      if (count > 0) {
        std::seed_seq seq{static_cast<uint32_t>(options_.seed), static_cast<uint32_t>(options_.seed >> 32),
                          static_cast<uint32_t>(epoch), static_cast<uint32_t>(s), 0x63617074U};
        std::mt19937 pick(seq);
        const int64_t k = std::uniform_int_distribution<int64_t>(0, count - 1)(pick);
        const int64_t a = offsets[k].item<int64_t>(), b = offsets[k + 1].item<int64_t>();
        f["text_ids"] = f["captions_ids"].narrow(0, a, b - a);
      }
    }
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
    fusion::ModalityInput in;
    in.padding = torch::ones({B, longest}, host.dtype(torch::kBool));
    if (m == Modality::text) {
      in.data = torch::full({B, longest}, options_.pad_id, host.dtype(torch::kLong));
    } else {
      in.data = torch::zeros({B, longest, dim}, host.dtype(options_.half_patches ? torch::kHalf : torch::kFloat));
      in.positions = torch::zeros({B, longest, 3}, host.dtype(torch::kLong));
    }
    for (size_t b = 0; b < samples.size(); ++b) {
      auto it = fields[b].find(name);
      if (it == fields[b].end() || it->second.size(0) == 0) continue;
      const auto row = static_cast<int64_t>(b);
      const int64_t n = std::min(longest, it->second.size(0));
      present[row][static_cast<int64_t>(mi)] = true;
      in.padding[row].narrow(0, 0, n).fill_(false);
      const at::Tensor values = it->second.narrow(0, 0, n);
      if (m == Modality::text) {
        in.data[row].narrow(0, 0, n).copy_(values.to(torch::kLong));
        continue;
      }
      in.data[row].narrow(0, 0, n).copy_(values.scalar_type() == torch::kUInt8 ? values.to(torch::kFloat) / 127.5 - 1.0
                                                                               : values.to(torch::kFloat));
      auto pos = fields[b].find(modalities::to_string(m) + "_positions");
      if (pos == fields[b].end() || pos->second.dim() != 2 || pos->second.size(1) != 3 ||
          pos->second.size(0) != it->second.size(0)) {
        throw DataError("sample '" + batch.ids[b] + "': " + name + " needs " + modalities::to_string(m) +
                        "_positions of shape (" + std::to_string(it->second.size(0)) + ", 3)");
      }
      in.positions[row].narrow(0, 0, n).copy_(pos->second.narrow(0, 0, n).to(torch::kLong));
    }
    batch.input.modalities[mi] = std::move(in);
  }
  batch.input.present = present;
  return batch;
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
