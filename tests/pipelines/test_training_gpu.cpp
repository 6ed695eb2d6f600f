// pipelines/training.h on a CUDA device: the fused AdamW kernel and the multi-tensor clipping equal torch's
// per-parameter implementations.
#include "tests/pipelines/optimizer_checks.h"

TEST_CASE("make_adamw's fused CUDA step equals torch::optim::AdamW, through a checkpoint", "[pipelines][gpu]") {
  REQUIRE(torch::cuda::is_available());
  longnet::test::check_fused_adamw_matches_torch(at::Device(at::kCUDA));
}

TEST_CASE("clip_grad_norm on CUDA equals torch::nn::utils::clip_grad_norm_", "[pipelines][gpu]") {
  REQUIRE(torch::cuda::is_available());
  longnet::test::check_clip_matches_torch(at::Device(at::kCUDA));
}

TEST_CASE("read_loss_and_clip reads the loss and the clipped norm at once on CUDA", "[pipelines][gpu]") {
  REQUIRE(torch::cuda::is_available());
  longnet::test::check_read_loss_and_clip(at::Device(at::kCUDA));
}

TEST_CASE("DeferredStep skips non-finite steps on the device as the host would (CUDA)", "[pipelines][gpu]") {
  REQUIRE(torch::cuda::is_available());
  longnet::test::check_deferred_step_matches_host_decision(at::Device(at::kCUDA));
}
