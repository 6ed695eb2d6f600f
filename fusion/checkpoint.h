// Activation checkpointing: a function of one tensor whose intermediate activations are not kept for the backward
// pass; the backward pass reruns it, with the random-number state (dropout) and autocast setting of the first run,
// and backpropagates through the rerun. Memory falls from every activation inside `fn` to its input alone, for one
// more forward pass of compute.
//
//   at::Tensor y = fusion::checkpointed([&](const at::Tensor& h) { return block(h, mask); }, x);
//
// Gradients reach x and every parameter `fn` uses (accumulated into their .grad, as for any leaf). Without grad mode,
// or when x needs no gradient, `fn` simply runs.
#pragma once

#include <functional>

#include <ATen/core/Tensor.h>

namespace longnet::fusion {

at::Tensor checkpointed(std::function<at::Tensor(const at::Tensor&)> fn, const at::Tensor& x);

}  // namespace longnet::fusion
