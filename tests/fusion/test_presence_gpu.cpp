// Presence bookkeeping on a CUDA device (fusion/strategies.h): with `present` on the host, every fusion strategy and
// info_nce queue their work without making the host wait for the device (CUDA's sync debug mode turns each wait into
// an error), the multimodal model gives the same outputs with `present` on the host, on the device or left out, and
// its whole forward does not wait once the batch's values are checked on the host.
#include <string>

#include <c10/cuda/CUDAFunctions.h>
#include <torch/torch.h>

#include "fusion/losses.h"
#include "fusion/multimodal_model.h"
#include "fusion/strategies.h"
#include "tests/fusion/multimodal_fixture.h"

#include <catch2/catch.hpp>

using namespace longnet;
using namespace longnet::test;
using fusion::MultimodalOutput;

namespace {

// Within its scope, an operation that waits for the device throws.
class WaitsAreErrors {
 public:
  WaitsAreErrors() : before_(c10::cuda::warning_state().get_sync_debug_mode()) {
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  }
  ~WaitsAreErrors() { c10::cuda::warning_state().set_sync_debug_mode(before_); }
  WaitsAreErrors(const WaitsAreErrors&) = delete;
  WaitsAreErrors& operator=(const WaitsAreErrors&) = delete;

 private:
  c10::cuda::SyncDebugMode before_;
};

MultimodalInput on_cuda(const MultimodalInput& in) {
  MultimodalInput out = in;
  for (auto& m : out.modalities) {
    if (!m) continue;
    for (at::Tensor* t : {&m->data, &m->positions, &m->padding}) {
      if (t->defined()) *t = t->to(torch::kCUDA);
    }
  }
  return out;
}

// The tiny model of `strategy` on the GPU.
fusion::MultimodalModel cuda_model(const std::string& strategy) {
  auto model = tiny_model_for(strategy);
  model->to(torch::kCUDA);
  return model;
}

// Four samples on the host, one without an image and one with neither text nor video.
MultimodalInput mixed_batch() {
  MultimodalInput in = full_batch(4, 2);
  in.present[1][mi(Modality::image)] = false;
  in.present[2][mi(Modality::text)] = in.present[2][mi(Modality::video)] = false;
  return in;
}

}  // namespace

TEST_CASE("with present on the host, fusion strategies and info_nce do not wait for the device", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  const std::string strategy = GENERATE(from_range(all_strategies()));
  CAPTURE(strategy);
  auto model = cuda_model(strategy);
  torch::NoGradGuard no_grad;
  const auto cuda = torch::TensorOptions(torch::kCUDA).dtype(torch::kDouble);
  torch::manual_seed(3);
  fusion::FusionInput in;
  const int64_t lengths[] = {6, 6, 8, 7};
  for (size_t m = 0; m < modalities::kModalityCount; ++m) in.tokens[m] = torch::randn({4, lengths[m], 16}, cuda);
  in.padding[mi(Modality::audio)] = torch::zeros({4, 7}, cuda.dtype(torch::kBool));
  in.padding[mi(Modality::audio)][0].narrow(0, 5, 2).fill_(true);
  in.present = torch::tensor({1, 1, 1, 1,  //
                              1, 0, 1, 1,  //
                              1, 0, 0, 1,  //
                              0, 0, 1, 0}, torch::kBool).view({4, 4});
  const at::Tensor warm_up = model->fusion().forward(in);  // lazy initialisation (handles, pinned pool) may wait
  fusion::FusionInput on_device = in;
  on_device.present = in.present.to(torch::kCUDA);
  const at::Tensor want = model->fusion().forward(on_device);

  const at::Tensor a = torch::randn({4, 8}, cuda), b = torch::randn({4, 8}, cuda);
  const at::Tensor both = in.present.select(1, 0) & in.present.select(1, 2);
  at::Tensor joint, loss;
  {
    const WaitsAreErrors guard;
    joint = model->fusion().forward(in);
    loss = fusion::info_nce(a, b, 0.07, both);
  }
  CHECK(torch::equal(joint, want));
  CHECK(torch::equal(joint, warm_up));
  CHECK(loss.item<double>() == fusion::info_nce(a, b, 0.07, both.to(torch::kCUDA)).item<double>());
}

TEST_CASE("the model on CUDA: present on the host, on the device or left out gives the same outputs", "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  const std::string strategy = GENERATE(from_range(all_strategies()));
  CAPTURE(strategy);
  auto model = cuda_model(strategy);
  torch::NoGradGuard no_grad;
  auto same = [](const MultimodalOutput& x, const MultimodalOutput& y) {
    CHECK(torch::equal(x.joint, y.joint));
    for (Modality m : modalities::kAllModalities) {
      CAPTURE(modalities::to_string(m));
      CHECK(torch::equal(x.tokens[mi(m)], y.tokens[mi(m)]));
      CHECK(torch::equal(x.embeddings[mi(m)], y.embeddings[mi(m)]));
    }
    CHECK(torch::equal(x.lm_logits, y.lm_logits));
    CHECK(torch::equal(x.present, y.present));
  };

  const MultimodalInput in = on_cuda(mixed_batch());
  const MultimodalOutput on_host = model(in);
  CHECK(on_host.present.is_cpu());
  MultimodalInput on_device = in;
  on_device.present = in.present.to(torch::kCUDA);
  same(on_host, model(on_device));

  MultimodalInput all = on_cuda(full_batch(3, 3));
  const MultimodalOutput given = model(all);
  all.present = at::Tensor();
  same(given, model(all));
}

TEST_CASE("the model's forward on CUDA does not wait for the device once the batch is checked on the host",
          "[fusion][gpu]") {
  REQUIRE(torch::cuda::is_available());
  const std::string strategy = GENERATE(from_range(all_strategies()));
  CAPTURE(strategy);
  auto model = cuda_model(strategy);
  torch::NoGradGuard no_grad;
  const MultimodalInput host = mixed_batch();
  model->check_ranges(host);  // the encoders' value checks, which on the device would wait for it
  const MultimodalInput in = on_cuda(host);
  const MultimodalOutput warm_up = model(in);
  MultimodalOutput out;
  {
    const WaitsAreErrors guard;
    out = model(in);
  }
  CHECK(torch::equal(out.joint, warm_up.joint));
}
