// pipelines/training.h: the fused AdamW step and multi-tensor gradient clipping equal torch's own on the CPU
// (tests/pipelines/test_training_gpu.cpp runs the same checks on a GPU).
#include "tests/pipelines/optimizer_checks.h"

TEST_CASE("make_adamw's fused step equals torch::optim::AdamW, through a checkpoint", "[pipelines][cpu]") {
  longnet::test::check_fused_adamw_matches_torch(at::Device(at::kCPU));
}

TEST_CASE("clip_grad_norm equals torch::nn::utils::clip_grad_norm_", "[pipelines][cpu]") {
  longnet::test::check_clip_matches_torch(at::Device(at::kCPU));
}

TEST_CASE("read_loss_and_clip reads the loss and the clipped norm at once", "[pipelines][cpu]") {
  longnet::test::check_read_loss_and_clip(at::Device(at::kCPU));
}

TEST_CASE("DeferredStep skips non-finite steps on the device as the host would", "[pipelines][cpu]") {
  longnet::test::check_deferred_step_matches_host_decision(at::Device(at::kCPU));
}
