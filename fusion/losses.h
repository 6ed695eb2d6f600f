// Losses of the multimodal model.
//
// info_nce: the symmetric contrastive loss of CLIP (Radford et al. 2021) between two batches of embeddings whose rows
// pair up: logits = a bᵀ / temperature, loss = (CE(logits, diag) + CE(logitsᵀ, diag)) / 2, over the samples that
// have both modalities only (the others are left out of the batch, not treated as negatives). The temperature is a
// number or a scalar tensor, so that it can be learned (CLIP learns log(1/temperature)).
//
//   at::Tensor both = out.present.select(1, 0) & out.present.select(1, 1);
//   at::Tensor loss = fusion::info_nce(out.embeddings[0], out.embeddings[1], 0.07, both);
#pragma once

#include <ATen/core/Tensor.h>

namespace longnet::fusion {

// a, b: (B, E) (L2-normalised by the caller when cosine similarities are wanted); temperature: a positive scalar
// tensor; both: (B,) bool or undefined (all rows). Rows where `both` is false are dropped. With no row left the loss
// is a zero that still belongs to the graph. Throws Error for mismatched shapes.
// `both` is read on the host, like the presence flags it comes from (fusion/strategies.h), so that finding its rows
// does not wait for the device; a mask on the device is accepted and costs that wait.
at::Tensor info_nce(const at::Tensor& a, const at::Tensor& b, const at::Tensor& temperature,
                    const at::Tensor& both = {});
at::Tensor info_nce(const at::Tensor& a, const at::Tensor& b, double temperature, const at::Tensor& both = {});

}  // namespace longnet::fusion
