// Batches of prepared samples (pipelines/shards.h) for training and evaluation: worker threads read and collate
// ahead of the consumer, in an order fixed by the seed, so that a resumed run sees exactly the batches it would have.
//
//   pipelines::ShardReader shards("data/demo/shards/train");
//   pipelines::Loader loader(shards, {.batch_size = 16, .seed = 7, .workers = 2});
//   loader.restore(checkpoint_state);          // optional: continue mid-epoch
//   while (auto batch = loader.next()) {        // forever when options.epochs == 0
//     auto out = model(batch->input);           // fusion::MultimodalInput, CPU tensors
//     save(loader.state());                     // the position after this batch
//   }
//
// Fields a sample may hold (written by `longnet prepare`; any subset, a missing one means the modality is absent):
//   text_ids            int32 (L)                 SentencePiece ids
//   <m>_patches         uint8 | float16 | float32 (N, dim) for m in image, video, audio; uint8 maps to x/127.5 - 1
//                       (batches hold float32 patches, or float16 with LoaderOptions::half_patches)
//   <m>_positions       int16 | int32 | int64 (N, 3)  (t, y, x) of each patch
// A batch pads each modality to the longest present sample (text with pad_id), gives padding masks (true = padding)
// and presence flags (B, 4) in modalities::Modality order. Modalities not in `modalities` are left out.
//
// Order: epoch e visits a permutation drawn from (seed, e); with bucket_batches > 0, windows of that many batches
// are sorted by sample length before being cut into batches (batches of similar lengths pad less), and the batches
// of a window are shuffled again. Batch k of epoch e is the same whatever the number of workers or where the run
// was resumed.
//
// Mixing (several sources, or LoaderOptions::epoch_samples > 0): an epoch is epoch_samples draws (default: the
// sources' total). Draw g picks a source with probability proportional to its weight, from a uniform keyed by
// (seed, g), and takes that source's next sample: each source walks through its own permutations, a fresh one per
// pass, drawn from (seed, source, pass). A source of weight 2 is thus seen twice as often as one of weight 1 of the
// same size, and a small source repeats within an epoch. Sample indices count over the sources in order (source
// 1's first sample follows source 0's last). Every draw is a function of its key, so the resume position
// (LoaderState: epoch, batch) is the whole cursor; there is no generator state to save.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "fusion/multimodal_model.h"
#include "modalities/encoders.h"
#include "pipelines/shards.h"

namespace longnet::pipelines {

struct LoaderOptions {
  int64_t batch_size = 8;
  uint64_t seed = 0;
  bool shuffle = true;
  int64_t epochs = 0;           // 0: endless; else next() returns nullopt after this many epochs
  bool drop_last = true;        // an incomplete last batch of an epoch is skipped
  int64_t bucket_batches = 0;   // 0: no length bucketing
  int64_t workers = 2;          // threads reading and collating
  int64_t prefetch = 4;         // batches ready ahead of the consumer
  int64_t pad_id = 0;           // text padding id
  std::array<bool, modalities::kModalityCount> modalities{true, true, true, true};
  std::array<int64_t, modalities::kModalityCount> max_tokens{0, 0, 0, 0};  // 0: no limit; longer samples truncated
  // For a CUDA consumer: patches as float16 (values as the float32 ones, rounded; the consumer converts on the GPU)
  // in page-locked memory, so that the host-to-device copy moves half the bytes and can run asynchronously.
  bool half_patches = false;
  bool pin_memory = false;  // needs a CUDA build and device
  // Samples with several captions (captions_ids/captions_offsets, pipelines/prepare.h): each epoch takes one of them
  // for text_ids, chosen by (seed, epoch, sample), instead of always the first.
  bool sample_captions = false;
  int64_t epoch_samples = 0;  // > 0: samples per epoch, drawn as in mixing (above); 0: see above
  // > 0: video comes from the fields video_patches_clip<k> / video_positions_clip<k> (the extra clips `longnet
  // prepare` stores for held-out samples, prepare.eval_clips); a video sample without them is a DataError.
  int64_t video_clip = 0;
  // Samples with several video clips: each epoch takes one, chosen by (seed, epoch, sample), like sample_captions
  // (video_clip > 0 overrides it).
  bool sample_video_clips = false;
  // Data-parallel ranks: every rank orders the same global batches of batch_size samples and collates its own
  // contiguous slice of batch_size / shard_count of them (batch_size must divide evenly).
  int64_t shard_rank = 0, shard_count = 1;
};

// One dataset of a mixture: its prepared samples, weight and the indices to draw from (empty: all).
struct LoaderSource {
  const ShardReader* reader = nullptr;
  double weight = 1.0;
  std::vector<int64_t> subset;
};

struct Batch {
  int64_t epoch = 0, index = 0;        // index of the batch in its epoch
  std::vector<int64_t> samples;        // indices into the ShardReader
  std::vector<std::string> ids;
  fusion::MultimodalInput input;       // CPU tensors
};

struct LoaderState {
  int64_t epoch = 0;
  int64_t batch = 0;  // next batch of that epoch
};

class Loader {
 public:
  // `subset`: the sample indices to draw from (empty: all of the reader). ConfigError for bad options, DataError
  // when no batch can be formed.
  Loader(const ShardReader& reader, LoaderOptions options, std::vector<int64_t> subset = {});
  // Several weighted sources (mixing, above); Batch::samples index their concatenation.
  Loader(std::vector<LoaderSource> sources, LoaderOptions options);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // The next batch; nullopt once `epochs` epochs are done. Errors from a worker (a corrupt shard) are rethrown here.
  std::optional<Batch> next();

  // Where the next call to next() continues; restore() moves there (and discards what was prefetched).
  LoaderState state() const;
  void restore(const LoaderState& state);

  int64_t batches_per_epoch() const { return batches_per_epoch_; }
  // Seconds next() spent waiting for a batch that was not ready yet (the consumer idled on data).
  double wait_seconds() const { return wait_seconds_; }

  // The sample indices of batch `index` of `epoch` (what a worker reads; exposed for tests).
  std::vector<int64_t> batch_samples(int64_t epoch, int64_t index) const;
  // Collates samples into a batch (exposed for tests and evaluation without threads); `epoch` picks the captions.
  Batch collate(const std::vector<int64_t>& samples, int64_t epoch = 0) const;

 private:
  void start();
  void stop();
  void work();
  std::vector<int64_t> epoch_order(int64_t epoch) const;
  std::vector<int64_t> mixed_order(int64_t epoch) const;  // positions into subset_
  std::pair<const ShardReader*, int64_t> locate(int64_t sample) const;
  // The fields of one sample that a batch uses, under their canonical names (text_ids is the epoch's caption,
  // video_* the epoch's clip); `sample` is the global index that keys those choices.
  std::map<std::string, at::Tensor> read_sample(const ShardReader& reader, int64_t local, int64_t sample,
                                                int64_t epoch) const;

  std::vector<LoaderSource> sources_;
  std::vector<int64_t> offsets_;  // first sample index of each source
  std::vector<double> cumulative_;  // normalised cumulative weights
  LoaderOptions options_;
  bool mixing_ = false;
  std::vector<int64_t> subset_;   // usable samples of all sources (sample indices)
  std::vector<int64_t> lengths_;  // per subset entry: total tokens, for bucketing
  std::vector<std::vector<int64_t>> source_positions_;  // per source: its positions in subset_
  mutable std::map<int64_t, std::vector<int64_t>> draws_before_;  // epoch -> draws per source before it (mutex_)
  int64_t epoch_samples_ = 0;  // samples an epoch: LoaderOptions::epoch_samples, else every usable one
  int64_t batches_per_epoch_ = 0;

  mutable std::mutex mutex_;
  std::condition_variable ready_cv_, space_cv_;
  // Batches are numbered linearly: epoch · batches_per_epoch + index.
  std::map<int64_t, Batch> ready_;
  int64_t next_to_claim_ = 0;    // next batch a worker takes
  int64_t next_to_deliver_ = 0;  // next batch next() returns
  std::exception_ptr error_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
  mutable std::map<int64_t, std::vector<int64_t>> order_cache_;  // epoch -> order (guarded by mutex_)
  double wait_seconds_ = 0;
};

}  // namespace longnet::pipelines
